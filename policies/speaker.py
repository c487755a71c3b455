"""Speaker embedding for the flow model: CAM++ (192-d) run through onnxruntime, as GLM-TTS ships it.

Input: 80-bin Kaldi fbank of the 16 kHz prompt (25 ms frames, 10 ms shift, no dither), mean-normalised over time.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def kaldi_fbank(audio: np.ndarray, sample_rate: int = 16000, bins: int = 80) -> np.ndarray:
    import kaldi_native_fbank as knf

    opts = knf.FbankOptions()
    opts.frame_opts.samp_freq = sample_rate
    opts.frame_opts.dither = 0.0
    opts.mel_opts.num_bins = bins
    fbank = knf.OnlineFbank(opts)
    fbank.accept_waveform(sample_rate, np.asarray(audio, dtype=np.float32).tolist())
    fbank.input_finished()
    if fbank.num_frames_ready == 0:
        raise ValueError(f"the prompt audio is too short for a speaker embedding ({len(audio)} samples)")
    return np.stack([fbank.get_frame(i) for i in range(fbank.num_frames_ready)]).astype(np.float32)


class CampPlus:
    """``frontend/campplus.onnx`` -> 192-d embedding of 16 kHz audio."""

    def __init__(self, onnx_path: str | Path, threads: int = 1) -> None:
        import onnxruntime as ort

        path = Path(onnx_path)
        if not path.is_file():
            raise FileNotFoundError(f"speaker model {path} does not exist")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, audio16k: np.ndarray) -> np.ndarray:
        feats = kaldi_fbank(audio16k)
        feats = feats - feats.mean(axis=0, keepdims=True)
        return self.session.run(None, {self.input_name: feats[None]})[0].reshape(-1)


def write_tiny_campplus(path: str | Path, dim: int = 192, seed: int = 0) -> None:
    """A stand-in ONNX graph with CAM++'s interface ([1, T, 80] -> [1, 192]: a random projection per frame, tanh,
    mean over time), for tests and the tiny checkpoint."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = np.random.default_rng(seed).normal(0, 0.1, (80, dim)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["input", "weight"], ["projected"]),
         helper.make_node("Tanh", ["projected"], ["activated"]),
         helper.make_node("ReduceMean", ["activated"], ["embedding"], axes=[1], keepdims=0)],
        "tiny_campplus",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, "frames", 80])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, [1, dim])],
        [numpy_helper.from_array(weight, "weight")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
