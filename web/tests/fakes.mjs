// Browser stand-ins for the extension tests (node --test web/tests/): a recording 2D context and just
// enough of an HTML element. Not a test file itself (it only exports).

import assert from "node:assert/strict";
import { rmSync } from "node:fs";

/** A 2D context that records calls and measures text at 6 px per character. */
export function recordingContext() {
  const calls = [];
  const state = {};
  return new Proxy(state, {
    get(target, prop) {
      if (prop === "calls") return calls;
      if (prop === "measureText") return (t) => ({ width: String(t).length * 6 });
      if (prop in target) return target[prop];
      return (...args) => calls.push([prop, ...args]);
    },
    set(target, prop, value) {
      target[prop] = value;
      calls.push(["set " + String(prop), value]);
      return true;
    },
  });
}

/** Just enough of an HTML element: children, style, dataset, listeners, a size set by the test. */
export class FakeElement {
  constructor(tag) {
    this.tagName = tag.toUpperCase();
    this.style = {};
    this.dataset = {};
    this.children = [];
    this.parent = null;
    this.listeners = {};
    this.attributes = {};
    this.title = "";
    this.attached = false; // true for the page's root elements
    this.clientWidth = 0;
    this.clientHeight = 0;
    this.zoom = 1; // getBoundingClientRect() / client size (a CSS transform)
    this.width = 300; // canvas bitmap
    this.height = 150;
    this.context = null;
  }
  get isConnected() {
    return this.attached || !!this.parent?.isConnected;
  }
  get parentNode() {
    return this.parent;
  }
  appendChild(child) {
    child.parent?.children.splice(child.parent.children.indexOf(child), 1);
    child.parent = this;
    this.children.push(child);
    return child;
  }
  remove() {
    if (this.parent) this.parent.children.splice(this.parent.children.indexOf(this), 1);
    this.parent = null;
  }
  addEventListener(type, fn) {
    (this.listeners[type] ??= []).push(fn);
  }
  dispatch(event) {
    event.target ??= this;
    for (const fn of this.listeners[event.type] ?? []) fn(event);
  }
  setAttribute(name, value) {
    this.attributes[name] = String(value);
  }
  getBoundingClientRect() {
    return { width: this.clientWidth * this.zoom, height: this.clientHeight * this.zoom };
  }
  getContext(kind) {
    assert.equal(kind, "2d");
    return (this.context ??= recordingContext());
  }
}

/** Removes the copied extension folder and the globals the fake frontend set (document, requestAnimationFrame, LiteGraph). */
export function removeFakeFrontend(dir) {
  rmSync(dir, { recursive: true, force: true });
  delete globalThis.document;
  delete globalThis.requestAnimationFrame;
  delete globalThis.LiteGraph;
}
