"""ONNX Runtime sessions with a deliberate provider and thread choice.

CUDA (with IOBinding) when a GPU is present, else CPU. On the CPU the engine shares a small box
with the HTTP workers, so ORT gets a fixed thread count and does not spin-wait: spinning threads
burn the cores the workers need for decoding.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

import numpy as np
import onnxruntime as ort
from loguru import logger

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


class Session(Protocol):
    """What the batcher needs from a model: one call from a uint8 NHWC batch to named outputs."""

    providers: list[str]

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]: ...


def gpu_present() -> bool:
    return Path("/dev/nvidiactl").exists() or Path("/proc/driver/nvidia/gpus").is_dir()


def choose_providers(prefer: str = "auto") -> list[str]:
    available = ort.get_available_providers()
    if prefer in ("auto", "cuda") and CUDA in available and gpu_present():
        return [CUDA, CPU]
    if prefer == "cuda":
        logger.warning("CUDA requested but no GPU/CUDA provider is present; using the CPU")
    return [CPU]


def default_threads() -> int:
    return max(1, len(os.sched_getaffinity(0)))


def session_options(threads: int) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return opts


class OrtSession:
    """A real ONNX Runtime session over a uint8 NHWC input."""

    def __init__(self, model: bytes | str, input_name: str, providers: list[str], threads: int):
        self._session = ort.InferenceSession(
            model, sess_options=session_options(threads), providers=providers
        )
        self.providers: list[str] = self._session.get_providers()
        names = [i.name for i in self._session.get_inputs()]
        self.input_name = input_name or names[0]
        if self.input_name not in names:
            raise ValueError(f"the graph has no input {self.input_name!r} (it has {names})")
        self.output_names = [o.name for o in self._session.get_outputs()]
        self._cuda = self.providers[0] == CUDA
        self._device_inputs: dict[tuple[int, ...], ort.OrtValue] = {}

    def describe(self) -> tuple[list[tuple[str, str, list[int]]], list[tuple[str, str, list[int]]]]:
        def spec(args: list[ort.NodeArg]) -> list[tuple[str, str, list[int]]]:
            return [
                (a.name, a.type, [d if isinstance(d, int) else -1 for d in a.shape]) for a in args
            ]

        return spec(self._session.get_inputs()), spec(self._session.get_outputs())

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        if not self._cuda:
            outputs = self._session.run(self.output_names, {self.input_name: batch})
            return dict(zip(self.output_names, outputs))
        # IOBinding: the batch goes host -> device once into a reused device buffer per shape.
        device_input = self._device_inputs.get(batch.shape)
        if device_input is None:
            device_input = ort.OrtValue.ortvalue_from_numpy(batch, "cuda", 0)
            self._device_inputs[batch.shape] = device_input
        else:
            device_input.update_inplace(batch)
        binding = self._session.io_binding()
        binding.bind_ortvalue_input(self.input_name, device_input)
        for name in self.output_names:
            binding.bind_output(name, "cpu")
        self._session.run_with_iobinding(binding)
        return dict(zip(self.output_names, binding.copy_outputs_to_cpu()))


def quiet_ort() -> None:
    """No CUDA/cuDNN error spam on a CPU box: ORT logs warnings and below only when asked."""
    ort.set_default_logger_severity(3)
