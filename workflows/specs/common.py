"""What the specs share: sampling presets per model family, prompts, node ids, the Notes, and the three graph
templates (checkpoint + KSampler, checkpoint + SamplerCustomAdvanced, the embedded digits model)."""

from __future__ import annotations

from pathlib import Path

from ..graph import CLIP, COND, IMAGE, LATENT, MODEL, VAE, Node, SpecError, Workflow

NOTES_DIR = Path(__file__).resolve().parent / "notes"

# Sampling presets per model family: (ckpt, steps, cfg, sampler, scheduler, latent type, width, height)
SDXL = dict(ckpt="sd_xl_base_1.0.safetensors", steps=30, cfg=7.0, sampler_name="dpmpp_2m", scheduler="karras",
            latent="EmptyLatentImage", width=1024, height=1024)
SD15 = dict(ckpt="v1-5-pruned-emaonly-fp16.safetensors", steps=30, cfg=7.5, sampler_name="euler",
            scheduler="normal", latent="EmptyLatentImage", width=512, height=512)
SD35 = dict(ckpt="sd3.5_medium_incl_clips_t5xxlfp8scaled.safetensors", steps=30, cfg=4.5, sampler_name="euler",
            scheduler="sgm_uniform", latent="EmptySD3LatentImage", width=1024, height=1024)
FLUX_DEV = dict(ckpt="flux1-dev-fp8.safetensors", steps=20, cfg=1.0, sampler_name="euler", scheduler="simple",
                latent="EmptySD3LatentImage", width=1024, height=1024)

NEG_SD = "blurry, low quality, jpeg artifacts, watermark, text, signature, deformed"
NEG_SD3 = "blurry, low quality, watermark, text"
NEG_WAN = ("static, still frame, blurry, overexposed, low quality, jpeg artifacts, watermark, subtitles, deformed, "
           "disfigured, extra limbs, fused fingers, messy background")

PROMPT_COLORS = {"positive": ("#232", "#353"), "negative": ("#322", "#533")}
GUIDANCE_ID = 10   # first Guidance Kit node; a chain takes 10, 11, 12, ...
NOTE_ID = 20
SEED = 42


SPEC_HEADER = "<!-- workflow: "  # a Note file that starts with this line declares its workflow (see declared())


def note(name: str) -> str:
    """The Note of workflow ``name``: the text of ``specs/notes/<name>.md`` as it is (the Note node shows plain
    text: one paragraph per line, no Markdown rendering), without a spec header line and the final newline."""
    path = NOTES_DIR / f"{name}.md"
    if not path.is_file():
        raise SpecError(f"{name}: no Note; write {path.relative_to(NOTES_DIR.parents[2]).as_posix()} (WHAT the "
                        f"method does and its paper, THESE VALUES, CHANGE FIRST, OTHER MODELS)")
    text = path.read_text(encoding="utf-8")
    if text.startswith(SPEC_HEADER):
        text = text.partition("\n")[2]
    return text.removesuffix("\n")


PRESETS = {"SDXL": SDXL, "SD15": SD15, "SD35": SD35, "FLUX_DEV": FLUX_DEV}
NEGATIVES = {"NEG_SD": NEG_SD, "NEG_SD3": NEG_SD3, "NEG_WAN": NEG_WAN}
TEMPLATES = ("checkpoint", "digits")


def declared(path: Path) -> tuple[str, object] | None:
    """A workflow declared in its Note file: (topic, spec function), or None for a plain Note.

    The file's first line is ``<!-- workflow: {JSON} -->`` (an HTML comment: GitHub does not show it, the Note
    node does not get it), the rest is the Note. JSON keys: ``topic`` (the specs module it is listed with),
    ``template`` ("checkpoint": Load Checkpoint → the chain → KSampler → decode → save, the default; "digits":
    the embedded digits model), ``title``, ``guidance`` (``[[node type, {widget: value}], ...]``, the chain), and
    for "checkpoint": ``family`` (shown in the README), ``preset`` (SDXL, SD15, SD35, FLUX_DEV), ``positive``,
    ``negative`` (a text or NEG_SD / NEG_SD3 / NEG_WAN), optional ``seed`` and preset overrides (``cfg``,
    ``steps``, ...); for "digits": ``cfg`` and optional ``digit``. A single-chain workflow for a new node is
    then this one file.
    """
    import json

    first = path.read_text(encoding="utf-8").partition("\n")[0]
    if not first.startswith(SPEC_HEADER):
        return None
    name = path.stem
    try:
        spec = json.loads(first[len(SPEC_HEADER):].removesuffix("-->").strip())
    except ValueError as e:
        raise SpecError(f"{path.name}: the workflow header is not valid JSON ({e})") from None
    template = spec.pop("template", "checkpoint")
    topic = spec.pop("topic", None)
    if template not in TEMPLATES or not topic:
        raise SpecError(f"{path.name}: the header needs a topic and a template in {TEMPLATES}")
    guidance = [(node_type, dict(widgets)) for node_type, widgets in spec.pop("guidance")]
    title = spec.pop("title")
    if template == "digits":
        return topic, lambda: digits_workflow(name, title, guidance, **spec)
    preset = PRESETS[spec.pop("preset")]
    negative = spec.pop("negative", "")
    negative = NEGATIVES.get(negative, negative)
    family, positive = spec.pop("family"), spec.pop("positive")
    return topic, lambda: checkpoint_workflow(name, title, family, preset, guidance, positive, negative, **spec)


def note_node(name: str, col: int = 0) -> Node:
    return Node(NOTE_ID, "Note", col, {"text": note(name)})


def _prompt_nodes(p: dict, positive: str, negative: str) -> list[Node]:
    return [
        Node(4, "CheckpointLoaderSimple", 0, {"ckpt_name": p["ckpt"]}),
        Node(6, "CLIPTextEncode", 1, {"text": positive}, {"clip": (4, CLIP)}, title="Positive prompt",
             color=PROMPT_COLORS["positive"]),
        Node(7, "CLIPTextEncode", 1, {"text": negative}, {"clip": (4, CLIP)}, title="Negative prompt",
             color=PROMPT_COLORS["negative"]),
        Node(5, p["latent"], 1, {"width": p["width"], "height": p["height"]}),
    ]


def _chain(nodes: list[Node], guidance: list[tuple[str, dict]], model: tuple[int, str], col: int) -> tuple[int, str]:
    """Append the Guidance Kit chain (ids 10, 11, ...) to ``nodes``; returns its MODEL output."""
    for i, (node_type, widgets) in enumerate(guidance):
        nodes.append(Node(GUIDANCE_ID + i, node_type, col, widgets, {"model": model}))
        model = (GUIDANCE_ID + i, MODEL)
    return model


def checkpoint_workflow(name: str, title: str, family: str, preset: dict, guidance: list[tuple[str, dict]],
                        positive: str, negative: str, seed: int = SEED, **overrides) -> Workflow:
    """Load Checkpoint → Guidance Kit chain → KSampler → VAE Decode → Save Image, with the Note of ``name``."""
    p = {**preset, **overrides}
    nodes = [*_prompt_nodes(p, positive, negative), note_node(name)]
    model = _chain(nodes, guidance, (4, MODEL), 2)
    positive_cond = (6, COND)
    if p.get("flux_guidance") is not None:  # under the positive prompt
        nodes.insert(2, Node(30, "FluxGuidance", 1, {"guidance": p["flux_guidance"]}, {"conditioning": (6, COND)}))
        positive_cond = (30, COND)
    nodes += [
        Node(3, "KSampler", 3, {"seed": seed, "steps": p["steps"], "cfg": p["cfg"], "sampler_name": p["sampler_name"],
                                "scheduler": p["scheduler"]},
             {"model": model, "positive": positive_cond, "negative": (7, COND), "latent_image": (5, LATENT)}),
        Node(8, "VAEDecode", 4, links={"samples": (3, LATENT), "vae": (4, VAE)}),
        Node(9, "SaveImage", 5, {"filename_prefix": f"guidance_kit/{name}"}, {"images": (8, IMAGE)}),
    ]
    return Workflow(name, title, family, nodes)


def custom_sampler_workflow(name: str, title: str, family: str, preset: dict, guidance: list[tuple[str, dict]],
                            sampler: tuple[str, dict], cfg: float, positive: str, negative: str,
                            seed: int = SEED, **overrides) -> Workflow:
    """Load Checkpoint → Guidance Kit chain → Guidance Guider + a SAMPLER node → SamplerCustomAdvanced → decode."""
    p = {**preset, **overrides}
    nodes = [*_prompt_nodes(p, positive, negative), note_node(name)]
    model = _chain(nodes, guidance, (4, MODEL), 2)
    sampler_type, sampler_widgets = sampler
    nodes += [
        Node(12, "GuidanceKit_GuidanceGuider", 3, {"cfg": cfg},
             {"model": model, "positive": (6, COND), "negative": (7, COND)}),
        Node(13, "RandomNoise", 3, {"noise_seed": seed}),
        Node(14, sampler_type, 3, sampler_widgets),
        Node(15, "BasicScheduler", 3, {"scheduler": p["scheduler"], "steps": p["steps"]}, {"model": (4, MODEL)}),
        Node(16, "SamplerCustomAdvanced", 4, links={"noise": (13, "NOISE"), "guider": (12, "GUIDER"),
                                                    "sampler": (14, "SAMPLER"), "sigmas": (15, "SIGMAS"),
                                                    "latent_image": (5, LATENT)}),
        Node(8, "VAEDecode", 5, links={"samples": (16, "output"), "vae": (4, VAE)}),
        Node(9, "SaveImage", 6, {"filename_prefix": f"guidance_kit/{name}"}, {"images": (8, IMAGE)}),
    ]
    return Workflow(name, title, family, nodes)


def digits_workflow(name: str, title: str, guidance: list[tuple[str, dict]], cfg: float,
                    digit: int = 3) -> Workflow:
    """Digits Model Loader → Guidance Kit chain → KSampler → Digits Decode → Preview Image (no download)."""
    nodes = [
        Node(4, "GuidanceKit_DigitsModelLoader", 0, {"digit": digit}),
        Node(5, "EmptyLatentImage", 0, {"width": 64, "height": 64, "batch_size": 8}),
        note_node(name),
    ]
    model = _chain(nodes, guidance, (4, MODEL), 1)
    nodes += [
        Node(3, "KSampler", 2, {"seed": SEED, "steps": 20, "cfg": cfg, "sampler_name": "euler", "scheduler": "normal"},
             {"model": model, "positive": (4, "positive"), "negative": (4, "negative"), "latent_image": (5, LATENT)}),
        Node(8, "GuidanceKit_DigitsDecode", 3, {"scale": 8}, {"samples": (3, LATENT)}),
        Node(9, "PreviewImage", 4, links={"images": (8, IMAGE)}),
    ]
    return Workflow(name, title, "embedded digits", nodes)


def wan21_t2v_workflow(name: str, title: str, prompt: str, shift: float, guidance: list[tuple[str, dict]],
                       sampler: dict) -> Workflow:
    """WAN 2.1 T2V 1.3B as ComfyUI's template loads it (UNETLoader, umt5 CLIPLoader, the WAN VAE, 832×480×33,
    ModelSamplingSD3 ``shift``), the ``guidance`` nodes chained from id 10, ``sampler`` the KSampler's widgets,
    saved as an animated WEBP."""
    nodes = [
        Node(4, "UNETLoader", 0, {"unet_name": "wan2.1_t2v_1.3B_fp16.safetensors", "weight_dtype": "default"}),
        Node(31, "CLIPLoader", 0, {"clip_name": "umt5_xxl_fp8_e4m3fn_scaled.safetensors", "type": "wan",
                                   "device": "default"}),
        Node(32, "VAELoader", 0, {"vae_name": "wan_2.1_vae.safetensors"}),
        note_node(name),
        Node(6, "CLIPTextEncode", 1, {"text": prompt}, {"clip": (31, CLIP)}, title="Positive prompt",
             color=PROMPT_COLORS["positive"]),
        Node(7, "CLIPTextEncode", 1, {"text": NEG_WAN}, {"clip": (31, CLIP)}, title="Negative prompt",
             color=PROMPT_COLORS["negative"]),
        Node(5, "EmptyHunyuanLatentVideo", 1, {"width": 832, "height": 480, "length": 33}),
        Node(30, "ModelSamplingSD3", 2, {"shift": shift}, {"model": (4, MODEL)}),
    ]
    model = 30
    for offset, (node_type, widgets) in enumerate(guidance):
        nodes.append(Node(10 + offset, node_type, 2, dict(widgets), {"model": (model, MODEL)}))
        model = 10 + offset
    nodes += [
        Node(3, "KSampler", 3, {"seed": SEED, **sampler},
             {"model": (model, MODEL), "positive": (6, COND), "negative": (7, COND), "latent_image": (5, LATENT)}),
        Node(8, "VAEDecode", 4, links={"samples": (3, LATENT), "vae": (32, VAE)}),
        Node(9, "SaveAnimatedWEBP", 5, {"filename_prefix": f"guidance_kit/{name}", "fps": 16.0, "lossless": False,
                                        "quality": 90, "method": "default"}, {"images": (8, IMAGE)}),
    ]
    return Workflow(name, title, "WAN 2.1 T2V 1.3B", nodes)
