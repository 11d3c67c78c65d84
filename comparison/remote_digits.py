"""The embedded digits rows drawn on ComfyUI servers: ``compare.py --server A --server B`` (no --workflow) and
``compare.py metrics --server A --server B``.

A row (a method stack, ``methods.py``) at a column's scale and seed becomes an API-format prompt built from
the pack's own nodes, with the same inputs ``methods.apply_row`` gives them in this process:
Digits Model Loader → each method node → KSampler (or SamplerCustom + BasicScheduler with a sampler
method's SAMPLER) → Save Latent. The Digits Model Loader gives one digit's conditioning, so each
requested digit is sampled by its own sampler node from the same seed (``--samples`` per digit); the
raw latents come back through ``/view`` (``output/guidance_kit_compare/`` on each server) and are
measured here exactly as the in-process samples are. Because the in-process runner samples all digits
in one batch (other noise per sample), its numbers are close to, not equal to, these; any two servers
give the same latents for a cell.
"""

from __future__ import annotations

import itertools

import torch

from .fanout import FanOut, Job, failure_text
from .methods import Row, is_conditioning, is_model, node_arguments, node_class
from .runs import CONFUSED_WITH, CellFailed, CellRun, EmbeddedRunner

LATENT_PREFIX = "guidance_kit_compare/digits"
LOADER = "GuidanceKit_DigitsModelLoader"
WEAK_WEIGHTS = "digits weak (for Autoguidance)"


def row_prompt(row: Row, scale: float, seed: int, steps: int, sampler_name: str, scheduler: str,
               samples_per_class: int, digits: tuple[int, ...]) -> tuple[dict, list[str]]:
    """(API prompt, the Save Latent node ids in ``digits`` order) of one cell."""
    prompt: dict = {}
    ids = itertools.count(1)

    def add(class_type: str, inputs: dict, title: str | None = None) -> str:
        node_id = str(next(ids))
        prompt[node_id] = {"class_type": class_type, "inputs": inputs, "_meta": {"title": title or class_type}}
        return node_id

    loader = add(LOADER, {"digit": digits[0], "weights": "digits"})
    negative, weak = [loader, 2], None

    def chain(own_negative) -> list:
        """The row's guidance nodes on the loader's model; CONDITIONING inputs get ``own_negative``."""
        nonlocal weak
        model = [loader, 0]
        for call in row.calls:
            if call.method.node is None or call.method.sampler:
                continue
            schema = node_class(call.method).define_schema()
            second = {}
            for spec in schema.inputs:
                if is_model(spec) and spec.id != "model":
                    weak = weak or add(LOADER, {"digit": digits[0], "weights": WEAK_WEIGHTS}, "weak model")
                    second[spec.id] = [weak, 0]
            arguments = node_arguments(call, scale, own_negative, seed, second)
            inputs = {"model": model}
            for spec in schema.inputs:
                value = arguments.get(spec.id)
                if spec.id != "model" and value is not None:
                    inputs[spec.id] = value if (is_conditioning(spec) or is_model(spec)) else _plain(value)
            model = [add(schema.node_id, inputs, call.label), 0]
        return model

    def confused(digit: int) -> list:  # the positive CONDITIONING of the digit most confused with ``digit``
        return [add(LOADER, {"digit": CONFUSED_WITH[digit], "weights": "digits"}, f"negative digit "
                                                                                   f"{CONFUSED_WITH[digit]}"), 1]

    shared = None if row.own_negative else chain(negative)
    cfg = row.cfg_at(scale)
    sampler = sigmas = None
    if row.sampler_call is not None:
        call = row.sampler_call
        schema = node_class(call.method).define_schema()
        arguments = {k: _plain(v) for k, v in node_arguments(call, scale, None).items() if v is not None}
        sampler = add(schema.node_id, arguments, call.label)
        sigmas = add("BasicScheduler", {"model": shared or [loader, 0], "scheduler": scheduler, "steps": steps,
                                         "denoise": 1.0})
    empty = add("EmptyLatentImage", {"width": 64, "height": 64, "batch_size": samples_per_class})
    saves = []
    for position, digit in enumerate(digits):
        condition = loader if position == 0 else add(LOADER, {"digit": digit, "weights": "digits"}, f"digit {digit}")
        model = shared if shared is not None else chain(confused(digit))
        common = {"model": model, "cfg": cfg, "positive": [condition, 1], "negative": negative,
                  "latent_image": [empty, 0]}
        if sampler is None:
            drawn = add("KSampler", {**common, "seed": seed, "steps": steps, "sampler_name": sampler_name,
                                     "scheduler": scheduler, "denoise": 1.0}, f"digit {digit}")
        else:
            drawn = add("SamplerCustom", {**common, "add_noise": True, "noise_seed": seed, "sampler": [sampler, 0],
                                          "sigmas": [sigmas, 0]}, f"digit {digit}")
        saves.append(add("SaveLatent", {"samples": [drawn, 0], "filename_prefix": LATENT_PREFIX}))
    return prompt, saves


def _plain(value):
    """A JSON value for the prompt (numpy / torch scalars as Python numbers)."""
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if hasattr(value, "item"):
        return value.item()
    return value


def read_latents(client, entry: dict, saves: list[str]) -> torch.Tensor:
    """The Save Latent files of a cell, digit-major [D·n, ...] → the in-process layout (sample-major)."""
    from safetensors.torch import load

    parts = []
    for node_id in saves:
        items = entry.get("outputs", {}).get(node_id, {}).get("latents", [])
        if not items:
            raise CellFailed(f"the cell ran on {client.url} but Save Latent (node {node_id}) gave no file")
        parts.append(load(client.download(items[0]))["latent_tensor"].float())
    stacked = torch.stack(parts)  # [digits, samples, 1, 8, 8]
    return stacked.transpose(0, 1).reshape(-1, *stacked.shape[2:])  # sample 0 of every digit, then sample 1, ...


class RemoteDigitsRunner(EmbeddedRunner):
    """EmbeddedRunner whose samples come from ComfyUI servers (``FanOut``); the metrics are computed here."""

    def __init__(self, fanout: FanOut, steps: int = 20, sampler: str = "euler", scheduler: str = "normal",
                 samples_per_class: int = 10, digits: tuple[int, ...] = tuple(range(10)), upscale: int = 4,
                 evaluator=None):
        super().__init__(steps, sampler, scheduler, samples_per_class, digits, upscale, evaluator)
        self.fanout = fanout
        self.drawn: dict[tuple[str, float, int], tuple[torch.Tensor, float]] = {}
        self.failed: dict[tuple[str, float, int], str] = {}
        self.last_seconds: float | None = None
        self.cancelled = False
        self.where = " on ComfyUI servers (each digit by its own sampler node, same seed)"

    def job(self, row: Row, scale: float, seed: int, label: str | None = None) -> Job:
        prompt, saves = row_prompt(row, scale, seed, self.steps, self.sampler, self.scheduler,
                                   self.samples_per_class, self.digits)
        return Job(label or f"{row.label} @ cfg {scale:g} seed {seed}", prompt,
                   lambda client, entry: read_latents(client, entry, saves))

    def prefetch(self, runs: list[tuple[Row, float, int]]) -> None:
        """Draw every (row, scale, seed) on the servers at once (the report then reads them in its order)."""
        unique = {}
        for row, scale, seed in runs:
            key = (row.text, float(scale), int(seed))
            if key not in self.drawn and key not in unique:
                unique[key] = (row, float(scale), int(seed))
        runs = list(unique.values())
        if not runs:
            return
        outcome = self.fanout.run([self.job(row, scale, seed) for row, scale, seed in runs])
        self.cancelled = self.cancelled or outcome.cancelled
        for k, (row, scale, seed) in enumerate(runs):
            key = (row.text, scale, seed)
            if k in outcome.results:
                samples, seconds, _ = outcome.results[k]
                self.drawn[key] = (samples, seconds)
            elif k in outcome.failures:
                self.failed[key] = failure_text(f"{row.label} @ cfg {scale:g} seed {seed}", outcome.failures[k])
            else:
                self.failed[key] = f"{row.label} @ cfg {scale:g} seed {seed}: not run (cancelled)"

    def samples(self, row: Row, scale: float, seed: int) -> torch.Tensor:
        key = (row.text, float(scale), int(seed))
        if key not in self.drawn and key not in self.failed:
            self.prefetch([(row, scale, seed)])
        if key in self.failed:
            raise CellFailed(self.failed[key])
        samples, self.last_seconds = self.drawn[key]
        return samples

    def run(self, row: Row, scale: float, seed: int) -> CellRun:
        samples = self.samples(row, scale, seed)
        return self.cell_run(samples, self.last_seconds)
