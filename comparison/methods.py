"""The methods compare.py can put in a row, applied through the pack's real node classes.

A row is a *stack*: ``apg`` · ``apg:eta=1,momentum=0`` · ``tcfg+apg+pag:scale=2``. Each method is
a Guidance Kit node whose ``execute`` patches the MODEL exactly as in a workflow; every input keeps
the node's own default unless the row sets it. A value may use the column's cfg as ``{scale}``,
e.g. ``fdg:scales={scale}, {scale/2}`` (arithmetic only). Conditioning inputs (NAG's negative) get
the run's negative conditioning; a negative prompt of a method's own (Perp-Neg, DNG: ``own_negative``) gets, on
the digits model, each sample's most confusable digit (the null class would be the uncond itself).

Every call also takes ``cfg=VALUE``: the sampler's cfg for the row instead of the column's scale
(``pag:scale={scale},cfg=1`` is PAG alone). Sampler methods (CFG++, PCG) replace the sampler of the
row; their guidance scale lives on another axis (CFG++'s λ ∈ [0, 1], PCG's γ), so their compare
default maps the column's CFG scale onto it (see ``Method.cfg``); the equal-strength table of
``compare.py metrics`` is the fair comparison.

The method list comes from the nodes: a node class declares its row with a literal ``COMPARE`` dict
(``key``; optional ``label`` (default: the class's ``LABEL``), ``overrides``, ``exact``, ``sampler``,
``cfg``, ``aliases``, ``report`` (its rows in ``compare.py metrics``, default the key) or
``not_in_report`` (why none), ``own_negative`` (its CONDITIONING input is a negative prompt of its own: on the
digits model each sample's most confusable digit, ``runs.CONFUSED_WITH``)). It is read from the node modules'
source, so row parsing needs no ComfyUI.
"""

from __future__ import annotations

import ast
import importlib
import operator
from dataclasses import dataclass, field
from pathlib import Path

from ..workflows.queue_workflow import QueueError, convert


class MethodSpecError(ValueError):
    """A row that does not parse or names an unknown method/input; the message lists what exists."""


@dataclass(frozen=True)
class Method:
    key: str
    label: str
    node: str | None  # "module:Class" under guidance_kit.nodes; None = plain CFG (no node)
    overrides: dict = field(default_factory=dict)  # the compare defaults that differ from the node's
    exact: bool = False  # has an exact counterpart on the Gaussian-mixture benchmark
    sampler: bool = False  # the node gives a SAMPLER (replaces the row's sampler) instead of patching the MODEL
    cfg: str | None = None  # the sampler cfg for a column scale, e.g. '{min(1, scale / 12.5)}'; None = the scale
    own_negative: bool = False  # its CONDITIONING input is a negative prompt of its own (Perp-Neg, DNG), see runs.py


PLAIN_CFG = Method("cfg", "CFG", None, exact=True)
NODES_DIR = Path(__file__).resolve().parent.parent / "nodes"
# the order of the method list (``compare.py methods``, the metrics report); other node modules follow by name
NODE_MODULE_ORDER = ("cfg_methods", "perturbation", "adaptive", "nag", "model_guidance", "scfg", "samplers")
COMPARE_KEYS = {"key", "label", "overrides", "exact", "sampler", "cfg", "aliases", "report", "not_in_report",
                "own_negative"}


@dataclass(frozen=True)
class CompareDeclaration:
    """A node class's ``COMPARE`` attribute, read from the node's source (this module runs without ComfyUI)."""

    method: Method
    aliases: dict[str, str]  # alias → row text, e.g. "linear_ag" → "adaptive:linear_ag=true"
    report: tuple[str, ...]  # the node's rows in ``compare.py metrics``
    not_in_report: str | None  # why it has none there


def _literal(node: ast.AST, where: str):
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError):
        raise MethodSpecError(f"compare: {where} must be a literal (it is read without importing ComfyUI)") from None


def _class_declaration(module: str, cls: ast.ClassDef) -> CompareDeclaration | None:
    values = {}
    for statement in cls.body:
        if isinstance(statement, ast.Assign) and len(statement.targets) == 1 and \
                isinstance(statement.targets[0], ast.Name) and statement.targets[0].id in ("COMPARE", "LABEL"):
            values[statement.targets[0].id] = statement.value
    if "COMPARE" not in values:
        return None
    where = f"nodes/{module}.py {cls.name}.COMPARE"
    spec = _literal(values["COMPARE"], where)
    if not isinstance(spec, dict) or "key" not in spec or set(spec) - COMPARE_KEYS:
        raise MethodSpecError(f"compare: {where} must be a dict with 'key' and only {sorted(COMPARE_KEYS)}")
    label = spec.get("label")
    if label is None and isinstance(values.get("LABEL"), ast.Constant):
        label = values["LABEL"].value
    if not label:
        raise MethodSpecError(f"compare: {where} needs a 'label' (the class has no literal LABEL)")
    key = spec["key"]
    method = Method(key, label, f"{module}:{cls.name}", dict(spec.get("overrides", {})), bool(spec.get("exact")),
                    bool(spec.get("sampler")), spec.get("cfg"), bool(spec.get("own_negative")))
    not_in_report = spec.get("not_in_report")
    report = () if not_in_report else tuple(spec.get("report", (key,)))
    return CompareDeclaration(method, dict(spec.get("aliases", {})), report, not_in_report)


def _module_rank(path: Path) -> tuple[int, str]:
    name = path.stem
    return (NODE_MODULE_ORDER.index(name) if name in NODE_MODULE_ORDER else len(NODE_MODULE_ORDER), name)


def node_declarations() -> list[CompareDeclaration]:
    """Every node class of the pack that declares ``COMPARE``, in the method list's order."""
    found = []
    for path in sorted(NODES_DIR.glob("*.py"), key=_module_rank):
        text = path.read_text(encoding="utf-8")
        if "COMPARE" not in text:
            continue
        for statement in ast.parse(text, filename=str(path)).body:
            if isinstance(statement, ast.ClassDef):
                declaration = _class_declaration(path.stem, statement)
                if declaration is None:
                    continue
                key = declaration.method.key
                taken = next((d.method.node for d in found if d.method.key == key), None)
                if taken is not None or key == PLAIN_CFG.key:
                    raise MethodSpecError(f"compare: {declaration.method.node} declares the key {key!r} of "
                                          f"{taken or 'plain CFG'}")
                found.append(declaration)
    return found


_DECLARATIONS = node_declarations()
METHODS: dict[str, Method] = {m.key: m for m in (PLAIN_CFG, *(d.method for d in _DECLARATIONS))}
ALIASES = {alias: target for d in _DECLARATIONS for alias, target in d.aliases.items()}
# The rows of `compare.py metrics`: every method of the pack at its compare defaults (a node's ``report`` rows).
ALL_METHODS = (PLAIN_CFG.key, *(row for d in _DECLARATIONS for row in d.report))
# Rows that `compare.py metrics` leaves out, and why (every other method is in ALL_METHODS; a test checks both).
NOT_IN_REPORT = {d.method.key: d.not_in_report for d in _DECLARATIONS if d.not_in_report}
CFG_SETTING = "cfg"  # the row's own sampler cfg, accepted by every call


@dataclass(frozen=True)
class MethodCall:
    method: Method
    settings: tuple[tuple[str, str], ...] = ()  # raw "name=value" pairs from the row

    @property
    def label(self) -> str:
        if not self.settings:
            return self.method.label
        return f"{self.method.label}({', '.join(f'{k}={v}' for k, v in self.settings)})"


@dataclass(frozen=True)
class Row:
    text: str
    calls: tuple[MethodCall, ...]

    @property
    def label(self) -> str:
        return " + ".join(c.label for c in self.calls)

    @property
    def exact(self) -> bool:
        return all(c.method.exact for c in self.calls) and self.cfg_expression() is None

    def cfg_expression(self) -> str | None:
        """The row's sampler-cfg expression: a ``cfg=`` setting (the last one wins), else a method's default."""
        for call in reversed(self.calls):
            for name, value in reversed(call.settings):
                if name == CFG_SETTING:
                    return value
        for call in self.calls:
            if call.method.cfg is not None:
                return call.method.cfg
        return None

    def cfg_at(self, scale: float) -> float:
        """The sampler cfg of this row in a column of ``scale``."""
        expression = self.cfg_expression()
        if expression is None:
            return float(scale)
        value = substitute_scale(expression, scale)
        try:
            return float(value)
        except ValueError:
            raise MethodSpecError(f"compare: row {self.text!r}: cfg={expression!r} is not a number") from None

    @property
    def own_negative(self) -> bool:
        """A method of the row takes a negative prompt of its own besides the sampler's (Perp-Neg, DNG)."""
        return any(c.method.own_negative for c in self.calls)

    @property
    def sampler_call(self):
        return next((c for c in self.calls if c.method.sampler), None)


def method_names() -> str:
    return ", ".join(METHODS)


def parse_row(text: str) -> Row:
    """'tcfg+apg:eta=1,momentum=0' → Row (the node inputs are checked when the row is applied)."""
    calls = []
    for part in _split_top(text, "+"):
        name, _, settings = part.partition(":")
        key = name.strip().lower().replace("-", "_").replace(" ", "_")
        key = ALIASES.get(key, key)
        if ":" in key:  # an alias with settings, e.g. linear_ag → adaptive:linear_ag=true
            key, _, preset = key.partition(":")
            settings = f"{preset},{settings}" if settings.strip() else preset
        if key not in METHODS:
            raise MethodSpecError(f"compare: unknown method {name.strip()!r} in row {text!r}; methods: "
                                  f"{method_names()}")
        pairs = []
        for assignment in _split_top(settings, ",") if settings.strip() else []:
            input_name, sep, value = assignment.partition("=")
            if not sep or not input_name.strip():
                raise MethodSpecError(f"compare: {assignment!r} in row {text!r} is not INPUT=VALUE "
                                      f"(e.g. apg:eta=1,momentum=0)")
            pairs.append((input_name.strip(), value.strip()))
        calls.append(MethodCall(METHODS[key], tuple(pairs)))
    if not calls:
        raise MethodSpecError(f"compare: empty row {text!r}; methods: {method_names()}")
    plain = [c for c in calls if c.method.node is None]
    if plain and len(calls) > 1:
        raise MethodSpecError(f"compare: 'cfg' is the plain sampler and cannot be stacked (row {text!r})")
    if sum(c.method.sampler for c in calls) > 1:
        raise MethodSpecError(f"compare: row {text!r} has two samplers; a row samples with one")
    row = Row(text, tuple(calls))
    if row.cfg_expression() is not None:
        row.cfg_at(5.0)  # a bad cfg= fails now, with the row named
    return row


def _split_top(text: str, separator: str) -> list[str]:
    """Split on ``separator`` outside {…} (so '{1 + scale}' and 'scales={scale}, {scale/2}' survive)."""
    parts, depth, current = [], 0, []
    for ch in text:
        depth += ch == "{"
        depth -= ch == "}"
        if ch == separator and depth == 0:
            parts.append("".join(current))
            current = []
            continue
        current.append(ch)
    parts.append("".join(current))
    if separator == ",":
        # "scales=10, 5": a piece without '=' continues the previous value
        merged = []
        for piece in parts:
            if merged and "=" not in piece:
                merged[-1] += "," + piece
            else:
                merged.append(piece)
        parts = merged
    return [p.strip() for p in parts if p.strip()]


_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
              ast.Pow: operator.pow, ast.USub: operator.neg, ast.UAdd: operator.pos}


def _arithmetic(node, scale: float) -> float:
    if isinstance(node, ast.Expression):
        return _arithmetic(node.body, scale)
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
        return float(node.value)
    if isinstance(node, ast.Name) and node.id == "scale":
        return scale
    if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
        return _OPERATORS[type(node.op)](_arithmetic(node.left, scale), _arithmetic(node.right, scale))
    if isinstance(node, ast.UnaryOp) and type(node.op) in _OPERATORS:
        return _OPERATORS[type(node.op)](_arithmetic(node.operand, scale))
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCTIONS
            and node.args and not node.keywords):
        return _FUNCTIONS[node.func.id](*(_arithmetic(a, scale) for a in node.args))
    raise ValueError("only numbers, 'scale', + - * / ** and min(), max() are allowed")


_FUNCTIONS = {"min": min, "max": max}


def substitute_scale(value: str, scale: float) -> str:
    """'{scale}, {scale/2}' with scale 6 → '6, 3'."""
    out, start = [], 0
    while True:
        open_at = value.find("{", start)
        if open_at < 0:
            out.append(value[start:])
            return "".join(out)
        close_at = value.find("}", open_at)
        if close_at < 0:
            raise MethodSpecError(f"compare: unbalanced '{{' in {value!r}")
        expression = value[open_at + 1:close_at]
        try:
            number = _arithmetic(ast.parse(expression, mode="eval"), scale)
        except (SyntaxError, ValueError, ZeroDivisionError) as e:
            raise MethodSpecError(f"compare: cannot evaluate {{{expression}}} in {value!r}: {e}") from None
        out.append(value[start:open_at])
        out.append(f"{number:g}")
        start = close_at + 1


def node_class(method: Method):
    module_name, _, class_name = method.node.partition(":")
    try:
        module = importlib.import_module(f"{__package__.rpartition('.')[0]}.nodes.{module_name}")
    except ImportError as e:
        raise MethodSpecError(f"compare: {method.label} is not available in this version of the pack ({e})") from None
    return getattr(module, class_name)


def is_model(spec) -> bool:
    """A MODEL input (Autoguidance's weak model), filled from the runner's second models."""
    return getattr(spec, "io_type", None) == "MODEL"


def is_conditioning(spec) -> bool:
    """A CONDITIONING input (NAG's negative): the V3 schema's ``io_type``, not the input's class name."""
    return getattr(spec, "io_type", None) == "CONDITIONING"


def _schema_inputs(cls) -> list:
    return list(cls.define_schema().inputs)


def _convert(raw: str, default, what: str):
    """``raw`` as the type of the input's default (the queue script's rules); text inputs take it as it is."""
    if not isinstance(default, (bool, int, float)):
        return raw
    try:
        return convert(raw, default, what)
    except QueueError as e:
        raise MethodSpecError(f"compare: {e}") from None


def node_arguments(call: MethodCall, scale: float, negative, seed: int | None = None,
                   models: dict | None = None) -> dict:
    """The node's execute() keyword arguments: its defaults, the compare defaults, then the row's settings.

    A method's own ``seed`` input (TPG, S²-Guidance, TSG, ICG) follows the run's ``seed`` unless the row sets it;
    a second MODEL input (Autoguidance's ``weak_model``) comes from ``models``, the runner's second models.
    """
    cls = node_class(call.method)
    inputs = _schema_inputs(cls)
    by_name = {i.id: i for i in inputs}
    settings = dict(call.method.overrides)
    for name, value in call.settings:
        if name == CFG_SETTING and name not in by_name:
            continue  # the row's sampler cfg (Row.cfg_at), not a node input
        if name not in by_name or name == "model":
            choices = ", ".join([i.id for i in inputs if i.id != "model"] + [f"{CFG_SETTING} (the row's sampler cfg)"])
            raise MethodSpecError(f"compare: {call.method.label} has no input {name!r}; its inputs: {choices}")
        settings[name] = value
    arguments = {}
    for spec in inputs:
        if spec.id == "model":
            continue
        if is_conditioning(spec):
            arguments[spec.id] = negative
            continue
        if is_model(spec):
            if not models or spec.id not in models:
                raise MethodSpecError(f"compare: {call.method.label} needs a second model ({spec.id}); the embedded "
                                      f"digits model has one (its weak version), a checkpoint run has none: use "
                                      f"the server mode with a workflow that loads both models.")
            arguments[spec.id] = models[spec.id]
            continue
        default = getattr(spec, "default", None)
        if spec.id == "seed" and spec.id not in settings and seed is not None:
            arguments[spec.id] = int(seed)
        elif spec.id in settings:
            raw = substitute_scale(str(settings[spec.id]), scale)
            arguments[spec.id] = _convert(raw, default, f"{call.method.label} input {spec.id!r}")
        else:
            arguments[spec.id] = default
    return arguments


def apply_row(model, row: Row, scale: float, negative=None, seed: int | None = None, models: dict | None = None):
    """``model`` patched by every method of the row through the nodes' own validate_inputs and execute."""
    for call in row.calls:
        if call.method.node is None or call.method.sampler:
            continue
        cls = node_class(call.method)
        arguments = node_arguments(call, scale, negative, seed, models)
        try:
            verdict = cls.validate_inputs(**arguments)
        except NotImplementedError:  # the node has no validate_inputs of its own
            verdict = True
        if verdict is not True:
            raise MethodSpecError(f"compare: row {row.text!r}: {verdict}")
        output = cls.execute(model, **arguments)
        model = getattr(output, "result", output)[0]
    return model


def row_sampler(row: Row, scale: float):
    """The SAMPLER object of the row's sampler method (a ComfyUI KSAMPLER), or None for the run's --sampler."""
    call = row.sampler_call
    if call is None:
        return None
    cls = node_class(call.method)
    arguments = node_arguments(call, scale, None)
    try:
        verdict = cls.validate_inputs(**arguments)
    except NotImplementedError:
        verdict = True
    if verdict is not True:
        raise MethodSpecError(f"compare: row {row.text!r}: {verdict}")
    output = cls.execute(**arguments)
    return getattr(output, "result", output)[0]


def plan_of_row(model, row: Row, scale: float):
    """The guidance plan the row's nodes put on ``model`` (for the exact mixture benchmark)."""
    from ..nodes.runtime.engine import plan_of

    return plan_of(apply_row(model, row, scale))
