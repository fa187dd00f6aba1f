"""What a technique plugin provides: parameters (JSON Schema), knobs, an estimate and ``apply_``."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from squeezelang.errors import PluginError
from squeezelang.hooks.schema import check_param_schema, schema_defaults

if TYPE_CHECKING:
    from squeezelang.hooks.context import StageContext
    from squeezelang.models.handle import ModelHandle
    from squeezelang.models.meta import ModelMeta


@dataclass(frozen=True)
class Knob:
    """A parameter the planner may solve (``auto``).

    ``compresses`` says which way compresses more: ``"up"`` when a larger value gives a smaller or
    faster model (a pruning ratio), ``"down"`` when a smaller one does (a rank, a bit width).
    """

    name: str
    lo: float
    hi: float
    compresses: str = "up"
    integer: bool = False
    description: str = ""

    def __post_init__(self) -> None:
        if self.compresses not in ("up", "down"):
            raise PluginError(f"knob '{self.name}': compresses must be 'up' or 'down'")
        if not self.lo <= self.hi:
            raise PluginError(f"knob '{self.name}': empty range {self.lo} .. {self.hi}")


@dataclass(frozen=True)
class Candidate:
    """One way a technique can serve in a pipeline the planner composes (``compose { … }``).

    ``params`` are the stage parameters (the planner fills ``data`` with the compose block's data
    set where ``needs_data``); ``autos`` the knobs left for the search, each over its full range.
    ``order`` places the stage in a pipeline (smaller first: vocabulary before pruning before
    distillation before quantization). ``risk`` is the plugin's prior of the quality it costs
    (0 lossless, 1 int8-like, larger worse; negative for a stage that recovers quality): the
    planner tries the pipelines that meet the size-type constraints in order of summed risk.
    ``speeds_up`` says the stage makes the model faster on CPU (needed when there is a latency
    constraint). ``heals``: a stage that only recovers quality lost by an earlier lossy stage.
    """

    label: str
    params: dict[str, Any]
    risk: float
    order: int
    autos: tuple[str, ...] = ()
    needs_data: bool = False
    speeds_up: bool = False
    heals: bool = False


class Technique:
    """Base class of technique plugins; subclasses set the class attributes and override methods.

    Lifecycle: ``squeeze check`` validates a stage's parameters against ``schema`` (and the model
    states in ``refuses``); ``squeeze plan`` calls ``estimate`` on meta-data only; ``squeeze run``
    calls ``apply_`` on the loaded model. ``rebuild_`` recreates non-standard modules when a saved
    model is loaded back (see ``ModelHandle.edits``).
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    #: Algorithms; the first is the default. Empty when the technique has only one.
    methods: ClassVar[tuple[str, ...]] = ()
    #: JSON Schema of the stage parameters (``method``, ``include``, ``exclude`` included).
    schema: ClassVar[dict[str, Any]] = {"type": "object", "properties": {},
                                        "additionalProperties": False}
    knobs: ClassVar[tuple[Knob, ...]] = ()
    #: Model states this technique adds (e.g. ``"quantized"``, ``"sparse"``).
    produces: ClassVar[frozenset[str]] = frozenset()
    #: Model states after which this technique cannot run (most refuse a quantized model).
    refuses: ClassVar[frozenset[str]] = frozenset({"quantized"})
    #: Parameters that name a declared data set, mapped to the columns the stage reads.
    data_params: ClassVar[dict[str, str]] = {}
    #: An example stage for ``squeeze explain`` and the plugin listing.
    example: ClassVar[str] = ""

    # ------------------------------------------------------------------ definition
    def validate_definition(self) -> None:
        """Check the plugin's own definition once, at registration."""
        check_param_schema(self.schema)
        props = self.schema.get("properties", {})
        if self.methods and "method" not in props:
            raise PluginError("it declares methods but its schema has no 'method' property")
        for knob in self.knobs:
            if knob.name not in props:
                raise PluginError(f"knob '{knob.name}' is not a property of its schema")

    def knob(self, name: str) -> Knob | None:
        return next((k for k in self.knobs if k.name == name), None)

    def defaults(self) -> dict[str, Any]:
        """Parameter defaults from the schema (``method`` defaults to the first method)."""
        values = schema_defaults(self.schema)
        if self.methods:
            values.setdefault("method", self.methods[0])
        return values

    def produces_for(self, params: dict[str, Any]) -> frozenset[str]:
        """The model states this stage adds, given its parameters (a method may add none)."""
        return self.produces

    def blockwise_for(self, params: dict[str, Any]) -> bool:
        """Whether the stage works on an offloaded model (``offload = true``) unit by unit: it
        reads and changes weights only inside ``resident(handle.model, module)`` or in the
        blocks ``block_stats`` yields, and never copies the model. False (the default): the
        executor loads the whole model into memory for the stage, and offloads it again after."""
        return False

    def stores_for(self, params: dict[str, Any]) -> frozenset[str]:
        """What the stage leaves in the saved model that an output format must be able to hold,
        as tags: ``"int8"``, ``"int8-kernels"``, ``"static-activations"`` (linear layers that
        quantize their inputs with stored scales), ``"per-tensor"`` (one scale per tensor),
        ``"int4"``, ``"bits:N"`` (codes of N bits, one tag per width a tensor may get),
        ``"group:G"`` (scales per run of G inputs), ``"fp8"`` (FP8 E4M3 codes, not integers:
        no ``"bits:N"`` tag), ``"sparse"`` (unstructured zeros, stored
        compactly), ``"n:m"`` (N:M runs), ``"low-rank"`` (factorized layers), ``"clustered"``
        (codebooks), ``"shared-layers"``. A structural change that leaves a smaller standard
        architecture stores nothing special. Given the parameters, without torch; the default is
        the states the stage produces (``produces_for``)."""
        return self.produces_for(params)

    def defaults_for(self, params: dict[str, Any]) -> dict[str, Any]:
        """The defaults that apply given the parameters written (a method may use only some)."""
        return self.defaults()

    def check(self, params: dict[str, Any]) -> list[tuple[str | None, str]]:
        """Cross-parameter checks the schema cannot express: ``[(key or None, message)]``."""
        return []

    def family_needs(self, params: dict[str, Any]) -> list[str]:
        """What the stage needs from the model's family, as the names a ``ModelFamily`` may list
        in ``unsupported`` (``"prune:heads"``, ``"shrink"``); ``squeeze check`` refuses the stage,
        at its position, on a family that cannot do one of them yet. None by default."""
        return []

    def candidates(self, task: str) -> list[Candidate]:
        """The ways this technique may be used when the planner composes a pipeline for a model of
        ``task`` (``compose { … }``); none by default, so a technique is only ever composed when
        its author says how."""
        return []

    # ------------------------------------------------------------------ behaviour
    def estimate(self, meta: ModelMeta, params: dict[str, Any]) -> ModelMeta:
        """Return the model meta-data after this stage, computed without weights."""
        raise NotImplementedError(f"technique '{self.name}' has no estimate")

    def estimate_with(self, meta: ModelMeta, params: dict[str, Any], ctx: StageContext) -> ModelMeta:
        """``estimate`` for effects that depend on data: ``ctx.data`` holds the recipe's data sets and
        ``ctx.model_dir`` the input model's directory (no weights are loaded). Defaults to
        ``estimate``; override it only when the data decides the result (``vocab_trim``)."""
        return self.estimate(meta, params)

    def apply_(self, handle: ModelHandle, params: dict[str, Any], ctx: StageContext) -> None:
        """Compress ``handle`` in place (it may replace ``handle.model``)."""
        raise NotImplementedError(f"technique '{self.name}' has no apply_")

    def rebuild_(self, model: Any, record: dict[str, Any]) -> Any:
        """Re-create this technique's non-standard modules on a freshly built model; return it."""
        return model
