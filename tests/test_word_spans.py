"""Where the CER reward says the errors are: jiwer's alignment of a timed hypothesis to the reference, and the speech
tokens those seconds map to, all hand-computed; the built-in ASR backends' word times."""

import math

import numpy as np
import pytest

from vocalign.policies.checkpoints import write_tiny_checkpoint
from vocalign.policies.codec import MelUnitCodec
from vocalign.policies.mel_units import MelUnits
from vocalign.policies.pipeline import TTSPipeline
from vocalign.rewards.asr import ParaformerASR, WhisperASR
from vocalign.rewards.base import Sample
from vocalign.rewards.cer import CERReward
from vocalign.rewards.text_norm import error_rate
from vocalign.rewards.timed_transcript import TimedTranscript, TimedWord
from vocalign.rewards.word_alignment import error_spans
from vocalign.rlhf.token_credit import token_value_grid, token_values
from vocalign.rlhf.tts_env import TTSEnv, token_timing

from .conftest import REPO
from .test_rewards_cer import tiny_whisper_folder, write_paraformer_folder

# "one two three four" heard at 25 Hz-friendly times: each word 0.2 s, 0.08 s apart (2 token slots)
HEARD = [TimedWord("one", 0.08, 0.28), TimedWord("two", 0.36, 0.56), TimedWord("three", 0.64, 0.84),
         TimedWord("four", 0.92, 1.12)]


def test_a_substituted_word_is_wrong_where_it_was_heard_and_its_tokens_only():
    spans = error_spans("one two ten four", HEARD, "en", 1.2)
    assert spans == [(0.08, 0.28, 0.0), (0.36, 0.56, 0.0), (0.64, 0.84, -1.0), (0.92, 1.12, 0.0)]
    values, touched = token_values(spans, 30, 25.0)
    assert np.flatnonzero(values).tolist() == list(range(16, 21))  # 0.64-0.84 s = tokens 16..20 at 25 Hz
    assert values[16] == -1.0
    assert np.flatnonzero(touched).tolist() == [*range(2, 7), *range(9, 14), *range(16, 21), *range(23, 28)]


def test_an_inserted_word_is_wrong_and_a_deleted_one_is_charged_to_the_gap_it_left():
    inserted = error_spans("one two four", HEARD, "en", 1.2)  # "three" was said but is not in the text
    assert [v for _, _, v in inserted] == [0.0, 0.0, -1.0, 0.0] and inserted[2][:2] == (0.64, 0.84)
    heard = HEARD[:2] + HEARD[3:]  # "three" missing: the gap 0.56-0.92 s is where it belonged
    deleted = error_spans("one two three four", heard, "en", 1.2)
    assert deleted == [(0.08, 0.28, 0.0), (0.36, 0.56, 0.0), (0.56, 0.92, -1.0), (0.92, 1.12, 0.0)]
    values, _ = token_values(deleted, 30, 25.0)
    assert np.flatnonzero(values).tolist() == list(range(14, 23))  # 0.56-0.92 s


def test_deletions_at_the_edges_and_without_a_gap():
    assert error_spans("zero one two three four five", HEARD, "en", 1.5)[0] == (0.0, 0.08, -1.0)
    assert error_spans("one two three four five six", HEARD, "en", 1.5)[-1] == (1.12, 1.5, -2.0)
    touching = [TimedWord("one", 0.0, 0.3), TimedWord("three", 0.3, 0.6)]  # no gap: charged to the word before
    assert error_spans("one two three", touching, "en", 0.6) == [(0.0, 0.3, -1.0), (0.3, 0.6, 0.0)]
    assert error_spans("one two", [], "en", 0.8) == [(0.0, 0.8, -2.0)]  # nothing heard: all of it
    assert error_spans("", HEARD[:1], "en", 0.4) == [(0.08, 0.28, -1.0)]  # nothing to say: an insertion


def test_span_values_sum_to_minus_the_errors_the_scalar_counts():
    heard = [TimedWord("One,", 0.0, 0.2), TimedWord("nine", 0.2, 0.4), TimedWord("three", 0.5, 0.7),
             TimedWord("six", 0.7, 0.9)]
    reference = "one two three four five"  # two errors and a deletion, whichever path jiwer takes
    spans = error_spans(reference, heard, "en", 1.0)
    wer = sum(-v for _, _, v in spans) / 5
    assert wer == pytest.approx(error_rate(reference, "One, nine three six", "en"))


def test_a_multi_token_word_shares_its_time_and_chinese_is_scored_by_character():
    spans = error_spans("你好世界", [TimedWord("你好", 0.0, 0.4), TimedWord("世节", 0.4, 0.8)], "zh", 0.8)
    np.testing.assert_allclose(spans, [(0.0, 0.2, 0.0), (0.2, 0.4, 0.0), (0.4, 0.6, 0.0), (0.6, 0.8, -1.0)])


def test_a_token_on_a_word_boundary_takes_both_words_and_the_grid_pads():
    spans = [(0.1, 0.3, -1.0), (0.3, 0.5, -1.0)]
    values, touched = token_values(spans, 20, 25.0)  # token 7 = 0.28-0.32 s holds the end of one, start of the other
    assert values[7] == -2.0 and values[6] == values[8] == -1.0
    assert np.flatnonzero(touched).tolist() == list(range(2, 13))  # 0.08-0.12 s ... 0.48-0.52 s
    shifted, _ = token_values(spans, 20, 25.0, delay_s=0.02)  # slots 20 ms later: 0.30 s is a slot boundary
    assert shifted[6] == shifted[7] == -1.0 and shifted[12] == 0.0
    grid, mask = token_value_grid([spans, []], [20, 5], 24, 25.0)
    assert grid.shape == (2, 24) and (grid[0, :20] == values).all() and not mask[1].any() and not mask[0, 20:].any()
    with pytest.raises(ValueError, match="token_rate_hz must be > 0"):
        token_values(spans, 4, 0.0)
    with pytest.raises(ValueError, match="does not fit width 10"):
        token_value_grid([spans], [12], 10, 25.0)


class TimedTranscriberDouble:
    """Test double: fixed timed transcripts; ``transcribe`` gives their text, as a real backend's would."""

    times_words = True

    def __init__(self, transcripts):
        self.transcripts = transcripts

    def transcribe(self, audios):
        return [t.text for t in self.transcripts[: len(audios)]]

    def transcribe_timed(self, audios):
        return self.transcripts[: len(audios)]


def test_the_cer_reward_adds_spans_and_keeps_its_transcript_and_value():
    asr = TimedTranscriberDouble([TimedTranscript("one two three four", tuple(HEARD))])
    sample = Sample(np.full(19200, 0.01, np.float32), 16000, "one two ten four", "en")
    with_spans = CERReward(transcribers={"en": asr}).score([sample])[0]
    without = CERReward(transcribers={"en": asr}, spans=False).score([sample])[0]
    assert with_spans.spans[2] == (0.64, 0.84, -1.0) and without.spans == []
    assert with_spans.value == without.value == math.exp(-2.5 / 4) and with_spans.info == without.info


def test_whisper_word_times_come_with_the_plain_transcript(tmp_path):
    tiny_whisper_folder(tmp_path)
    asr = WhisperASR(tmp_path, max_new_tokens=6)
    audios = [np.random.default_rng(0).normal(0, 0.1, 16000).astype(np.float32), np.zeros(8000, np.float32)]
    plain = asr.transcribe(audios)
    with pytest.raises(ValueError, match="no alignment_heads"):
        asr.transcribe_timed(audios)
    silence = Sample(np.zeros(16000, np.float32), 16000, "hello", "en")
    assert CERReward(transcribers={"en": asr}).score([silence])[0].spans == []  # cannot time words: no spans
    asr.model.generation_config.alignment_heads = [[0, 0], [0, 1]]
    asr.times_words = True
    timed = asr.transcribe_timed(audios)
    assert [t.text for t in timed] == plain
    for t in timed:
        assert "".join(w.word for w in t.words) == t.text.replace(" ", "")
        assert all(0.0 <= w.start_s <= w.end_s <= 30.0 for w in t.words)


def test_paraformer_times_each_character(tmp_path):
    write_paraformer_folder(tmp_path)
    asr = ParaformerASR(tmp_path)
    audios = [np.random.default_rng(k).normal(0, 0.1, 32000).astype(np.float32) for k in range(2)]
    timed = asr.transcribe_timed(audios)
    assert [t.text for t in timed] == asr.transcribe(audios)
    for t in timed:
        assert [w.word for w in t.words] == list(t.text)
        starts = [w.start_s for w in t.words]
        assert starts == sorted(starts) and all(0.0 <= w.start_s < w.end_s <= 2.0 for w in t.words)


def test_the_env_records_each_codecs_token_rate_and_the_decoded_audio_keeps_it(tmp_path):
    demo = MelUnitCodec(MelUnits.load(REPO / "demo" / "ckpt" / "mel_units"))
    assert token_timing(demo) == {"token_rate_hz": 25.0, "token_delay_s": 0.0}
    assert len(demo.decode([[3] * 50], [None])[0]) / demo.sample_rate == 50 / 25.0
    glm = TTSPipeline.from_pretrained(write_tiny_checkpoint(tmp_path / "ckpt"))
    assert TTSEnv(glm).token_timing == {"token_rate_hz": 25.0, "token_delay_s": 0.0}
    voice = glm.prepare_prompt((0.1 * np.sin(np.arange(16000) / 7)).astype(np.float32), 16000, "hi")
    audio = glm.codec.decode([[1] * 20], [voice], flow_steps=1)[0]
    assert len(audio) / glm.codec.sample_rate == 20 / 25.0


def test_words_that_overlap_by_a_frame_or_by_float_rounding_give_valid_spans():
    """A recogniser's frame times (91 * 0.01 s) may put a word's start a hair before the previous one's end, or a
    frame before it: the spans still pass the contract, and a run is not stopped by float noise."""
    from vocalign.rewards.base import check_spans

    heard = [TimedWord("one", 0.5, 91 * 0.01), TimedWord("two", 0.91, 1.11), TimedWord("three", 1.10, 1.4)]
    spans = error_spans("one two three", heard, "en", 1.5)
    check_spans(spans, 1.5, "test")
    assert [s[:2] for s in spans] == [(0.5, 91 * 0.01), (91 * 0.01, 1.11), (1.11, 1.4)]
