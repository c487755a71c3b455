"""Mel units, the demo TTS's codec: fitting, encoding, decoding, files, and the pipeline built on them."""

import json

import numpy as np
import pytest

from vocalign.policies.codec import MelUnitCodec, VoicePrompt
from vocalign.policies.mel_units import MelUnits, MelUnitsConfig

RATE = 16000
SMALL = MelUnitsConfig(num_codes=8, griffin_lim_iters=4)


def tone(freq: float, seconds: float = 1.0) -> np.ndarray:
    t = np.arange(int(seconds * RATE)) / RATE
    return (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


@pytest.fixture(scope="module")
def units():
    return MelUnits.fit([tone(f) for f in (200, 400, 800, 1600, 3200)], SMALL, seed=0)


def test_codes_come_at_25_hz_and_decode_to_their_duration(units):
    codes = units.encode(tone(400, 2.0))
    assert SMALL.code_rate == 25 and abs(len(codes) - 50) <= 1
    audio = units.decode(codes)
    assert audio.dtype == np.float32 and len(audio) == len(codes) * SMALL.hop * SMALL.frames_per_code
    assert units.decode([]).size == 0


def test_codes_separate_pitches_and_survive_a_round_trip(units):
    low, high = units.encode(tone(200)), units.encode(tone(3200))
    middle = slice(3, -3)  # away from the edges, where the frames see padding
    assert set(low[middle]).isdisjoint(high[middle])
    again = units.encode(units.decode(low))
    assert np.mean(np.array(again[middle]) == np.array(low[middle])) >= 0.8


def test_decoding_is_deterministic_and_independent_of_the_batch(units):
    short, long = units.encode(tone(800, 0.5)), units.encode(tone(200, 1.5))
    np.testing.assert_array_equal(units.decode(short), units.decode(short))
    batched = units.decode_batch([long, [], short])
    assert batched[1].size == 0
    np.testing.assert_array_equal(batched[0], units.decode(long))
    np.testing.assert_array_equal(batched[2], units.decode(short))


def test_files_round_trip_and_bad_folders_are_refused(units, tmp_path):
    folder = units.save(tmp_path / "mel_units")
    loaded = MelUnits.load(folder)
    assert loaded.cfg == units.cfg
    np.testing.assert_array_equal(loaded.centroids, units.centroids)
    (folder / "config.json").write_text(json.dumps({"num_codes": 8, "hop_length": 320}))
    with pytest.raises(ValueError, match="unknown setting.*hop_length"):
        MelUnits.load(folder)
    with pytest.raises(FileNotFoundError, match="not a mel-units folder"):
        MelUnits.load(tmp_path / "nowhere")


def test_bad_codes_and_shapes_are_refused(units):
    with pytest.raises(ValueError, match="0..7"):
        units.decode([3, 8])
    with pytest.raises(ValueError, match="centroids have shape"):
        MelUnits(SMALL, np.zeros((4, 160), np.float32))
    with pytest.raises(ValueError, match="cannot fit 8 centroids"):
        MelUnits.fit([tone(400, 0.1)], SMALL)


def test_codec_tokenizes_any_rate_and_decodes_a_batch(units):
    codec = MelUnitCodec(units)
    audio24 = np.interp(np.arange(24000) / 24000, np.arange(RATE) / RATE, tone(400))
    assert abs(len(codec.tokenize(audio24.astype(np.float32), 24000)) - 25) <= 1
    codes, condition = codec.encode_prompt(tone(400), RATE)
    prompt = VoicePrompt("hi", codes, condition)
    out = codec.decode([codes, []], [prompt, prompt])
    assert [len(a) for a in out] == [len(codes) * 640, 0]
    with pytest.raises(ValueError, match="too short"):
        codec.encode_prompt(tone(400, 0.01), RATE)
