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
import difflib
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

    @classmethod
    def from_mapping(cls, fields: Mapping[str, Any]) -> Sample:
        """A sample from a mapping that may hold more than a sample's fields (a rollout's per-sample extras)."""
        return cls(**{f.name: fields[f.name] for f in dataclasses.fields(cls) if f.name in fields})


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
    earns; 0.0 when not declared) and ``requires`` (see :func:`score_all`)."""

    name: str

    def score(self, samples: Sequence[Sample]) -> list[RewardResult]: ...


def min_value(plugin: RewardPlugin) -> float:
    """The value an invalid sample earns from ``plugin``: its declared ``min_value``, else 0.0."""
    return float(getattr(plugin, "min_value", 0.0))


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


def build_reward(name: str, target: str | None = None, **settings: Any) -> RewardPlugin:
    """Instantiate reward ``name`` from a built-in, an entry point, or an explicit ``target`` dotted path."""
    known = available_rewards()
    path = target or known.get(name)
    if path is None:
        raise ValueError(f"unknown reward {name!r}; known: {sorted(known)}. Install a package that registers it "
                         f"under the entry-point group {ENTRY_POINT_GROUP!r}, or give `target: package.module:Class`")
    factory = _import_target(path)
    _check_settings(name, path, factory, settings)
    plugin = factory(**settings)
    if getattr(plugin, "name", None) != name:
        plugin.name = name  # the config's name is what the trainer and the logs use
    if not isinstance(plugin, RewardPlugin):
        raise TypeError(f"{path} built a {type(plugin).__name__}, which has no score(samples) method")
    return plugin


def _check_settings(name: str, path: str, factory: Callable[..., Any], settings: Mapping[str, Any]) -> None:
    """Name a setting the plugin does not take (with the closest one it does) before it loads a model."""
    try:
        parameters = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):  # no introspectable signature (a C extension): let the call itself complain
        return
    if any(p.kind is p.VAR_KEYWORD for p in parameters):
        return
    accepted = [p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    for key in settings:
        if key not in accepted:
            close = difflib.get_close_matches(key, accepted, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"reward {name!r} ({path}) has no setting {key!r}{hint} Its settings: {accepted}")


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
        subset = [samples[i] for i in todo]
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
