"""The reward plugin contract and the registry that finds plugins.

A plugin scores a batch of utterances and never sees the trainer, so the same object runs in-process, behind a
reward server, or in an evaluation script. Plugins are found three ways, first match wins: the built-ins registered
here, the entry-point group ``vocalign.rewards`` (a third-party package adds a reward without touching vocalign),
and a dotted path ``package.module:Class`` in a config.

A plugin that needs another's output (laughter needs the CER plugin's transcript) lists it in ``requires``; it then
receives those results through ``score(samples, upstream=...)``, so the ASR runs once.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, Protocol, TypeVar, runtime_checkable

import numpy as np

from ..common.settings import from_dict, settings_class

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "vocalign.rewards"
T = TypeVar("T")


@dataclass
class Sample:
    """One generated utterance to score."""

    audio: np.ndarray  # float32 mono in [-1, 1]
    sample_rate: int
    text: str  # what it should say
    language: str  # "zh" | "en" | ...
    prompt_audio: np.ndarray | None = None  # the voice prompt, for speaker similarity
    prompt_sample_rate: int | None = None
    emotion: str | None = None  # intended emotion label, if any
    # per-utterance values beyond the above (a target pitch, a speaker id): the prompt row's other columns; each
    # plugin gets those it declares in ``sample_fields`` (see :func:`plugin_sample_fields`)
    fields: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> Sample:
        """A sample from a mapping that may hold more than a sample's fields (a rollout's per-sample extras)."""
        return cls(**{f.name: values[f.name] for f in dataclasses.fields(cls) if f.name in values})


SAMPLE_FIELD_TYPES: dict[str, type] = {"str": str, "int": int, "float": float}  # what a prompt row's cell can be


def plugin_sample_fields(plugin: Any) -> dict[str, type]:
    """The per-utterance fields ``plugin`` needs beyond a :class:`Sample`'s own, as it declares them in
    ``sample_fields``: ``{"target_pitch": float}`` (or the type's name, ``"float"``, as a config writes it).

    A plugin names what it reads so that a prompt file's column reaches it in-process and over the wire without a
    change to vocalign, and so that a column nobody reads, or one a plugin needs and a row lacks, is an error when
    the prompts load rather than a silent default. Every declared field is required in every sample."""
    declared = getattr(plugin, "sample_fields", None) or {}
    where = f"reward {getattr(plugin, 'name', type(plugin).__name__)!r}"
    if not isinstance(declared, Mapping):
        raise ValueError(f"{where}: sample_fields must map field names to types, e.g. {{'target_pitch': float}}; "
                         f"got {declared!r:.100}")
    own = {f.name for f in dataclasses.fields(Sample)}
    out: dict[str, type] = {}
    for name, kind in declared.items():
        if not isinstance(name, str) or not name.isidentifier() or name in own:
            raise ValueError(f"{where}: sample field {name!r} must be an identifier other than a Sample's own "
                             f"fields {sorted(own)}")
        kind = SAMPLE_FIELD_TYPES.get(kind, kind) if isinstance(kind, str) else kind
        if kind not in SAMPLE_FIELD_TYPES.values():
            raise ValueError(f"{where}: sample field {name!r} has type {kind!r}; the types are "
                             f"{sorted(SAMPLE_FIELD_TYPES)}")
        out[name] = kind
    return out


def declared_sample_fields(plugins: Sequence[Any]) -> dict[str, type]:
    """Every field some plugin of ``plugins`` declares; two plugins that declare one name with two types are an
    error, since one prompt column cannot be both."""
    out: dict[str, type] = {}
    for plugin in plugins:
        for name, kind in plugin_sample_fields(plugin).items():
            if out.setdefault(name, kind) is not kind:
                raise ValueError(f"sample field {name!r} is declared as {out[name].__name__} by one reward and as "
                                 f"{kind.__name__} by {plugin.name!r}; rename one")
    return out


def describe_sample_fields(plugins: Sequence[Any]) -> str:
    """``cer: none; pitch: target_pitch (float)``: what each plugin declares, for an error message."""
    return "; ".join(f"{p.name}: " + (", ".join(f"{n} ({k.__name__})" for n, k in plugin_sample_fields(p).items())
                                      or "none") for p in plugins)


def check_field_value(name: str, value: Any, kind: type, where: str) -> Any:
    """``value`` as a field of type ``kind`` (an integer is a float too), or a ``ValueError`` saying what is wrong.
    Numbers must be finite: a NaN target would make every score NaN."""
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ValueError(f"{where}: field {name!r} must be {kind.__name__}, got {value!r:.100}")
    if kind is float and not math.isfinite(value):
        raise ValueError(f"{where}: field {name!r} must be a finite number, got {value!r}")
    return value


def fields_for(name: str, declared: Mapping[str, type], sample: Sample, where: str) -> dict[str, Any]:
    """The fields of ``sample`` that reward ``name`` declares (``declared``: its :func:`plugin_sample_fields`, read
    once per plugin, not per sample), checked; a declared field the sample lacks is an error. Fields it does not
    declare are not passed, in-process as over the wire."""
    missing = [field for field in declared if sample.fields.get(field) is None]
    if missing:
        raise ValueError(f"{where}: reward {name!r} needs field(s) {missing}, which the sample does not have "
                         f"(it has {sorted(sample.fields)}); add them as columns of the prompt file")
    return {field: check_field_value(field, sample.fields[field], kind, where) for field, kind in declared.items()}


OK, INVALID, FAILED = "ok", "invalid", "failed"
STATUSES = (OK, INVALID, FAILED)


Span = tuple[float, float, float]  # (start_s, end_s, value) over a sample's audio
SPAN_TOLERANCE_S = 0.05  # a recogniser's last word may end a frame or two past the audio (Whisper: 20 ms steps)
SPAN_OVERLAP_NOISE_S = 1e-6  # spans that touch may overlap by float rounding of frame times (91 * 0.01 > 0.91)


def check_spans(spans: Sequence[Span], duration_s: float | None, where: str) -> None:
    """Raise ``ValueError`` naming ``where`` unless ``spans`` are finite ``(start_s, end_s, value)`` triples with
    ``0 <= start < end <= duration_s`` (+ :data:`SPAN_TOLERANCE_S`), sorted and non-overlapping.

    Spans say *where* a reward found what it scored (the CER reward: a misread word's time, valued by its local
    penalty), so that training can credit the speech tokens that made that stretch of audio; a span outside the
    audio or overlapping another would credit the wrong tokens, or some twice. ``duration_s=None`` checks all but
    the end bound (a reply read off the wire, before its sample is known)."""
    previous_end = 0.0
    for k, span in enumerate(spans):
        if len(span) != 3 or not all(isinstance(x, (int, float)) and math.isfinite(x) for x in span):
            raise ValueError(f"{where}: span {k} must be three finite numbers (start_s, end_s, value), got {span!r}")
        start, end, _ = span
        if not 0.0 <= start < end:
            raise ValueError(f"{where}: span {k} {span!r} needs 0 <= start_s < end_s (seconds of the scored audio)")
        if duration_s is not None and end > duration_s + SPAN_TOLERANCE_S:
            raise ValueError(f"{where}: span {k} {span!r} ends after the audio ({duration_s:.3f} s); clip it")
        if start < previous_end - SPAN_OVERLAP_NOISE_S:
            raise ValueError(f"{where}: span {k} {span!r} starts before span {k - 1} ends ({previous_end:.3f} s); "
                             "spans must be sorted by time and must not overlap")
        previous_end = end


@dataclass
class RewardResult:
    """One sample's score, and whether it could be scored.

    Two kinds of sample cannot be scored normally, and training must treat them differently:

    - ``invalid``: the policy is to blame (empty audio, an utterance longer than a reward accepts, nothing but
      non-speech). The sample keeps a real ``value``, the reward's minimum (:func:`min_value`), so the policy learns
      not to produce it.
    - ``failed``: something outside the policy went wrong (a server refused or lost the sample, a model raised). The
      value is NaN and the trainer masks the sample out of advantages and loss instead of teaching the policy
      anything from it.

    Both are counted per step (``rewards/<name>/invalid``, ``rewards/<name>/masked``) and a recipe bounds their share.

    ``spans`` (optional, default none) localise the score in time: ``(start_s, end_s, value)`` over the scored audio,
    valid as :func:`check_spans` says; a plugin that cannot say where leaves them empty.
    """

    value: float
    info: dict[str, Any] = field(default_factory=dict)  # e.g. the transcript; JSON-serialisable
    status: str = OK
    reason: str = ""  # why the sample is invalid or failed; empty when ok
    spans: list[Span] = field(default_factory=list)  # where in the audio the score comes from; see check_spans

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"RewardResult.status must be one of {STATUSES}, got {self.status!r}")

    @classmethod
    def invalid(cls, plugin: RewardPlugin, reason: str) -> RewardResult:
        """The policy's fault: scored at the plugin's minimum."""
        return cls(min_value(plugin), {}, INVALID, reason)

    @classmethod
    def failed(cls, reason: str) -> RewardResult:
        """Not the policy's fault: no value; the trainer masks the sample."""
        return cls(float("nan"), {}, FAILED, reason)


@runtime_checkable
class RewardPlugin(Protocol):
    """``name`` and ``score``; optionally ``min_value`` (the lowest value ``score`` gives, what an invalid sample
    earns; 0.0 when not declared), ``requires`` (see :func:`score_all`), ``sample_fields`` (the per-utterance
    fields it reads, see :func:`plugin_sample_fields`) and ``roles`` (which info keys the evaluation tables read,
    see :func:`plugin_roles`)."""

    name: str

    def score(self, samples: Sequence[Sample]) -> list[RewardResult]: ...


def min_value(plugin: RewardPlugin) -> float:
    """The value an invalid sample earns from ``plugin``: its declared ``min_value``, else 0.0."""
    return float(getattr(plugin, "min_value", 0.0))


ROLES: dict[str, str] = {  # what an evaluation table reads from a plugin's info, whatever the plugin is called
    "error_rate": "the recogniser's error rate (CER or WER) of the utterance, lower is better",
    "similarity": "the speaker similarity of the utterance to its voice prompt (a cosine), higher is better",
}


def plugin_roles(plugin: Any) -> dict[str, str]:
    """Which of ``plugin``'s ``info`` keys plays which role of :data:`ROLES`, as it declares them in ``roles``:
    ``{"error_rate": "cer"}`` says that ``info["cer"]`` is an error rate. The held-out and sweep tables find their
    metrics this way, so that a recogniser or speaker encoder under another name fills the same columns, and a
    column never holds a reward value in place of the measure it names."""
    declared = getattr(plugin, "roles", None) or {}
    where = f"reward {getattr(plugin, 'name', type(plugin).__name__)!r}"
    if not isinstance(declared, Mapping) or not all(isinstance(k, str) for k in declared.values()):
        raise ValueError(f"{where}: roles must map a role to an info key, e.g. {{'error_rate': 'cer'}}; "
                         f"got {declared!r:.100}")
    unknown = sorted(set(declared) - set(ROLES))
    if unknown:
        raise ValueError(f"{where}: unknown role(s) {unknown}; the roles are {sorted(ROLES)}")
    return dict(declared)


_BUILTINS: dict[str, str] = {
    "cer": "vocalign.rewards.cer:CERReward",
    "sim": "vocalign.rewards.similarity:SpeakerSimilarityReward",
    "emotion": "vocalign.rewards.emotion:EmotionReward",
    "laughter": "vocalign.rewards.laughter:LaughterReward",
    "energy": "vocalign.rewards.energy:EnergyReward",
}


def _import_target(path: str) -> Callable[..., RewardPlugin]:
    module_name, _, attr = path.partition(":") if ":" in path else path.rpartition(".")
    if not module_name or not attr:
        raise ValueError(f"reward target {path!r} must look like 'package.module:Class'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"cannot import reward module {module_name!r} for {path!r}: {err}") from err
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ValueError(f"module {module_name!r} has no {attr!r} (reward target {path!r})") from None


def available_rewards() -> dict[str, str]:
    """Name -> import target of every reward this environment knows: built-ins, then entry points."""
    found = dict(_BUILTINS)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        found.setdefault(ep.name, ep.value)
    return found


def registered_plugin(name: str) -> Callable[..., RewardPlugin] | None:
    """The class (or factory) registered as reward ``name``, built-in or entry point, not instantiated: what a
    remote reward of that name reads its declarations from; None when no plugin is registered under ``name``."""
    path = available_rewards().get(name)
    return None if path is None else _import_target(path)


def build_reward(name: str, target: str | None = None, **settings: Any) -> RewardPlugin:
    """Instantiate reward ``name`` from a built-in, an entry point, or an explicit ``target`` dotted path."""
    known = available_rewards()
    path = target or known.get(name)
    if path is None:
        raise ValueError(f"unknown reward {name!r}; known: {sorted(known)}. Install a package that registers it "
                         f"under the entry-point group {ENTRY_POINT_GROUP!r}, or give `target: package.module:Class`")
    factory = _import_target(path)
    plugin = factory(**_check_settings(name, factory, settings))
    if getattr(plugin, "name", None) != name:
        plugin.name = name  # the config's name is what the trainer and the logs use
    if not isinstance(plugin, RewardPlugin):
        raise TypeError(f"{path} built a {type(plugin).__name__}, which has no score(samples) method")
    plugin_sample_fields(plugin)  # a malformed declaration fails when the recipe loads, not at the first score
    plugin_roles(plugin)
    return plugin


def _check_settings(name: str, factory: Callable[..., Any], settings: Mapping[str, Any]) -> dict[str, Any]:
    """``settings`` as the plugin takes them (a number YAML read as a string made a float): a setting the plugin
    does not take (named with the closest one it does), one it lacks, or one of the wrong type is refused before it
    loads a model, the constructor's parameters read as a config section."""
    try:
        parameters = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):  # no introspectable signature (a C extension): let the call itself complain
        return dict(settings)
    if any(p.kind is p.VAR_KEYWORD for p in parameters):
        return dict(settings)
    checked = from_dict(settings_class(factory), dict(settings), f"reward {name!r}")
    return {key: getattr(checked, key) for key in settings}


def build_backend(what: str, backends: Mapping[str, Callable[..., T]], kind: str, /, **settings: Any) -> T:
    """``backends[kind](**settings)``: how a plugin builds the model it was configured with (an ASR, a speaker
    encoder, an emotion classifier). One place, so an unknown ``kind`` reads the same everywhere and lists the
    known ones."""
    if kind not in backends:
        raise ValueError(f"unknown {what} kind {kind!r}; known: {sorted(backends)}")
    return backends[kind](**settings)


def plugin_requires(plugin: RewardPlugin) -> tuple[str, ...]:
    return tuple(getattr(plugin, "requires", ()))


def dependency_order(plugins: Sequence[RewardPlugin]) -> list[RewardPlugin]:
    """Plugins sorted so that each comes after what it ``requires``; missing or cyclic needs are errors."""
    by_name = {p.name: p for p in plugins}
    ordered: list[RewardPlugin] = []
    state: dict[str, str] = {}

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if state.get(name) == "done":
            return
        if state.get(name) == "visiting":
            raise ValueError(f"reward dependencies form a cycle: {' -> '.join(chain + (name,))}")
        if name not in by_name:
            raise ValueError(f"reward {chain[-1]!r} requires {name!r}, which is not configured")
        state[name] = "visiting"
        for need in plugin_requires(by_name[name]):
            visit(need, chain + (name,))
        state[name] = "done"
        ordered.append(by_name[name])

    for plugin in plugins:
        visit(plugin.name, ())
    return ordered


def score_all(plugins: Sequence[RewardPlugin], samples: Sequence[Sample]) -> dict[str, list[RewardResult]]:
    """Score with every plugin, each in its own thread as soon as what it ``requires`` is scored.

    Rewards are independent models (an ASR, a speaker encoder, servers behind HTTP), and most of their time is spent
    outside the interpreter (in torch, in worker processes, waiting on a server), so running them side by side
    takes about as long as the slowest one, not the sum. A plugin's error is raised here, as it would be in turn."""
    ordered = dependency_order(plugins)  # what a plugin requires is submitted before it
    verdicts = [screen(sample) for sample in samples]  # once per sample, whatever the number of plugins
    with ThreadPoolExecutor(max_workers=len(ordered), thread_name_prefix="reward") as pool:
        futures: dict[str, Future[list[RewardResult]]] = {}
        for plugin in ordered:
            upstream = {name: futures[name] for name in plugin_requires(plugin)}
            futures[plugin.name] = pool.submit(_score_one, plugin, samples, verdicts, upstream)
        return {name: future.result() for name, future in futures.items()}


MAX_SAMPLE_SECONDS = 60.0  # longer than any utterance a TTS policy should produce, and than rewards accept


def screen(sample: Sample) -> RewardResult | None:
    """What a sample earns before any plugin sees it, or None when it can be scored.

    Empty audio (the policy stopped at once, or drew nothing but non-speech tokens) and audio longer than
    :data:`MAX_SAMPLE_SECONDS` are the policy's outputs: invalid, at each plugin's minimum. Non-finite samples come
    from the synthesis pipeline, not the policy: failed, so masked."""
    audio = np.asarray(sample.audio)
    if audio.size == 0:
        return RewardResult(0.0, {}, INVALID, "empty audio")
    if audio.size / sample.sample_rate > MAX_SAMPLE_SECONDS:
        return RewardResult(0.0, {}, INVALID, f"{audio.size / sample.sample_rate:.0f} s of audio, over the "
                                              f"{MAX_SAMPLE_SECONDS:.0f} s rewards accept")
    if not np.isfinite(audio).all():
        return RewardResult.failed("the audio has NaN or inf samples (a synthesis fault)")
    return None


def _score_one(plugin: RewardPlugin, samples: Sequence[Sample], verdicts: Sequence[RewardResult | None],
               upstream: Mapping[str, Future[list[RewardResult]]]) -> list[RewardResult]:
    """``plugin``'s results for ``samples``; samples :func:`screen` rejected (``verdicts``), or that a required
    plugin could not score, get their result here and are not handed to the plugin."""
    needed = {n: f.result() for n, f in upstream.items()}  # upstream plugins were submitted first: no deadlock
    results: list[RewardResult | None] = [None] * len(samples)
    for i, early in enumerate(verdicts):
        if early is not None:
            results[i] = RewardResult.invalid(plugin, early.reason) if early.status == INVALID else early
        elif failed := sorted(n for n, r in needed.items() if r[i].status == FAILED):
            results[i] = RewardResult.failed(f"{', '.join(failed)} could not score it")
    todo = [i for i, r in enumerate(results) if r is None]
    if todo:
        declared = plugin_sample_fields(plugin)
        subset = [_own_fields(plugin.name, declared, samples[i], f"sample {i}") for i in todo]
        if needed:
            out = plugin.score(subset, upstream={n: [r[i] for i in todo] for n, r in needed.items()})  # type: ignore[call-arg]
        else:
            out = plugin.score(subset)
        if len(out) != len(subset):
            raise RuntimeError(f"reward {plugin.name!r} returned {len(out)} results for {len(subset)} samples")
        for i, result in zip(todo, out):
            try:
                check_spans(result.spans, len(samples[i].audio) / samples[i].sample_rate,
                            f"reward {plugin.name!r}, sample {i}")
            except ValueError as err:  # the reward's fault, not the policy's: masked and counted, not fatal
                logger.warning("%s", err)
                result = RewardResult.failed(f"invalid spans: {err}")
            results[i] = result
    return results  # type: ignore[return-value]


def _own_fields(name: str, declared: Mapping[str, type], sample: Sample, where: str) -> Sample:
    """``sample`` as reward ``name`` gets it: with the fields it declares and no others, as a server would."""
    if not sample.fields and not declared:
        return sample
    return dataclasses.replace(sample, fields=fields_for(name, declared, sample, where))
