// Pixels of Chromium's screenshots for the browser check (browser_check.mjs): a PNG decoder and the
// colour tests of what the node plots draw. Only exports (not a test file).

import { inflateSync } from "node:zlib";

/** RGBA pixels of an 8-bit, non-interlaced PNG (what Chromium's screenshots are). */
export function decodePng(buf) {
  if (buf.readUInt32BE(0) !== 0x89504e47) throw new Error("not a PNG");
  let pos = 8;
  let width, height, colorType, bitDepth, interlace;
  const idat = [];
  while (pos < buf.length) {
    const len = buf.readUInt32BE(pos);
    const type = buf.toString("latin1", pos + 4, pos + 8);
    const data = buf.subarray(pos + 8, pos + 8 + len);
    if (type === "IHDR") {
      width = data.readUInt32BE(0);
      height = data.readUInt32BE(4);
      bitDepth = data[8];
      colorType = data[9];
      interlace = data[12];
    } else if (type === "IDAT") idat.push(data);
    else if (type === "IEND") break;
    pos += 12 + len;
  }
  const channels = { 0: 1, 2: 3, 4: 2, 6: 4 }[colorType];
  if (bitDepth !== 8 || !channels || interlace) throw new Error(`unsupported PNG (depth ${bitDepth}, colour ${colorType})`);
  const raw = inflateSync(Buffer.concat(idat));
  const stride = width * channels;
  const px = Buffer.alloc(height * stride);
  for (let y = 0; y < height; y++) {
    const filter = raw[y * (stride + 1)];
    const src = raw.subarray(y * (stride + 1) + 1, (y + 1) * (stride + 1));
    const row = px.subarray(y * stride, (y + 1) * stride);
    const prev = y ? px.subarray((y - 1) * stride, y * stride) : Buffer.alloc(stride);
    for (let i = 0; i < stride; i++) {
      const a = i >= channels ? row[i - channels] : 0;
      const b = prev[i];
      const c = i >= channels ? prev[i - channels] : 0;
      let v = src[i];
      if (filter === 1) v += a;
      else if (filter === 2) v += b;
      else if (filter === 3) v += (a + b) >> 1;
      else if (filter === 4) {
        const p = a + b - c;
        const pa = Math.abs(p - a), pb = Math.abs(p - b), pc = Math.abs(p - c);
        v += pa <= pb && pa <= pc ? a : pb <= pc ? b : c;
      }
      row[i] = v & 0xff;
    }
  }
  const rgba = Buffer.alloc(width * height * 4);
  for (let i = 0; i < width * height; i++) {
    const s = px.subarray(i * channels, (i + 1) * channels);
    const [r, g, b, al] = channels >= 3 ? [s[0], s[1], s[2], channels === 4 ? s[3] : 255] : [s[0], s[0], s[0], channels === 2 ? s[1] : 255];
    rgba.set([r, g, b, al], i * 4);
  }
  return { width, height, rgba };
}

/** Pixels of a PNG that pass test(r, g, b). */
export function countPixels(png, test) {
  let n = 0;
  const d = png.rgba;
  for (let i = 0; i < d.length; i += 4) if (test(d[i], d[i + 1], d[i + 2])) n++;
  return n;
}
// The curve is #5ab0ff and the message #ff7a7a; anti-aliased edges and thin text come out darker,
// so these test the hue and a minimum brightness rather than the exact colour. The window shading
// (a faint blue over a dark background) and the grey lines / labels pass neither.
export const isCurve = (r, g, b) => b >= 150 && b - r >= 70 && g >= 90;
export const isError = (r, g, b) => r >= 100 && r - g >= 40 && r - b >= 40;
// The Annealing Guidance plot's run overlay: #ffa640 (line, dots) over its translucent band.
export const isRun = (r, g, b) => r >= 190 && g >= 110 && g <= 190 && b <= 110;
