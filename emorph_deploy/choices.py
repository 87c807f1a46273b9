"""Torch-free ``(str, Enum)`` choices shared by the library and the command line.

The CLI imports these at start-up, so this module imports nothing heavy (no torch, no numpy).
"""

from __future__ import annotations

from enum import Enum

from emorph_deploy.errors import InputError

__all__ = [
    "Amp",
    "Backend",
    "BestMetric",
    "BuildTarget",
    "CalibrationKind",
    "CalibrationMethod",
    "CheckPrecision",
    "Choice",
    "ExportOutputs",
    "ExportTarget",
    "Flavour",
    "Fp16Mode",
    "GridPreset",
    "GridSampleMode",
    "Interp",
    "Precision",
    "Quantizer",
    "Similarity",
    "SyntheticKind",
]


class Choice(str, Enum):
    """Base of the choices below: ``str(member)`` and f-strings give the value (``"fp16"``, not
    ``"Precision.fp16"``), and :meth:`coerce` turns a string into a member or a one-line InputError."""

    def __str__(self) -> str:
        return str(self.value)

    @classmethod
    def coerce(cls, value: str | Choice, what: str | None = None) -> Choice:
        try:
            return cls(value)
        except ValueError:
            choices = ", ".join(m.value for m in cls)
            raise InputError(
                f"{what or cls.__name__}: expected one of {choices}, got {value!r}; fix: pass one of those"
            ) from None


class Backend(Choice):
    """Inference backend of a runner; ``auto`` = TensorRT, then OpenVINO (CPU), then ONNX Runtime (GPU, then
    CPU), then torch (:func:`emorph_deploy.runners.resolve`)."""

    auto = "auto"
    tensorrt = "tensorrt"
    onnxruntime = "onnxruntime"
    torch = "torch"
    openvino = "openvino"


class Precision(Choice):
    """Numeric precision of an exported graph, TensorRT engine or OpenVINO IR (bf16: OpenVINO on CPUs with
    AVX512-BF16 or AMX)."""

    fp32 = "fp32"
    fp16 = "fp16"
    bf16 = "bf16"
    int8 = "int8"


class CheckPrecision(Choice):
    """Tolerance set of ``emorph check``: a :class:`Precision`, or ``auto`` = the artifact's recorded one."""

    auto = "auto"
    fp32 = Precision.fp32.value
    fp16 = Precision.fp16.value
    bf16 = Precision.bf16.value
    int8 = Precision.int8.value


class BuildTarget(Choice):
    """What ``emorph build`` writes: a TensorRT engine or an OpenVINO IR (CPU)."""

    tensorrt = "tensorrt"
    openvino = "openvino"


class Flavour(Choice):
    """TensorRT distribution: ``auto`` = ``tensorrt`` when importable, else ``tensorrt-rtx``."""

    auto = "auto"
    tensorrt = "tensorrt"
    tensorrt_rtx = "tensorrt-rtx"


class Fp16Mode(Choice):
    """How an fp16 engine is built: ``graph`` (mixed-precision ONNX, strongly typed) or ``flag``
    (``BuilderFlag.FP16``, TensorRT 10.x)."""

    graph = "graph"
    flag = "flag"


class SyntheticKind(Choice):
    """Synthetic pairs: ``brains`` (SynthMorph-style pairs from the MNI152 tissue maps with independent
    contrasts, :mod:`emorph_deploy.data.brainsynth`), ``synth`` (random label maps), ``template`` (MNI152 T1
    under known deformations) or ``mix`` (synth/template alternating)."""

    brains = "brains"
    mix = "mix"
    synth = "synth"
    template = "template"


class CalibrationKind(Choice):
    """The :class:`SyntheticKind` values INT8 calibration draws from (it has no ``brains`` pairs)."""

    template = SyntheticKind.template.value
    synth = SyntheticKind.synth.value
    mix = SyntheticKind.mix.value


class Amp(Choice):
    """Mixed precision of the training forward pass: ``auto`` = bf16 where the device computes it natively
    (CUDA with bf16, or a CPU with AVX512-BF16 or AMX), fp32 elsewhere, decided at run time on every
    machine."""

    none = "none"
    auto = "auto"
    bf16 = "bf16"
    fp16 = "fp16"


class BestMetric(Choice):
    """The validation column ``best`` follows (named as in ``val_log.csv``): ``auto`` = ``dice`` when the
    validation pairs have labels, else ``ncc``; ``dice_aligned`` = Dice of the brain pairs without their
    residual affines (what the network meets after emorph's affine pre-alignment)."""

    auto = "auto"
    dice = "dice"
    dice_aligned = "dice_aligned"
    ncc = "ncc"


class GridPreset(Choice):
    """Model grid preset of :data:`emorph_deploy.data.PRESETS`: 1 mm 160×192×224 or 2 mm 80×96×112."""

    mm1 = "1mm"
    mm2 = "2mm"


class CalibrationMethod(Choice):
    """Activation range calibration of the INT8 quantizer."""

    minmax = "minmax"
    entropy = "entropy"
    percentile = "percentile"


class Quantizer(Choice):
    """Tool that writes the QDQ graph: ONNX Runtime, NVIDIA Model Optimizer, or ``auto``."""

    onnxruntime = "onnxruntime"
    modelopt = "modelopt"
    auto = "auto"


class GridSampleMode(Choice):
    """Warp in an exported graph: ``gather`` (decomposed sampler, opset 17) or ``native`` (ONNX GridSample,
    opset 20)."""

    gather = "gather"
    native = "native"


class Interp(Choice):
    """Sampling of ``emorph apply``: ``linear`` (trilinear, float32 out), ``nearest`` (nearest voxel, values
    and dtype kept) or ``label`` (ANTs' GenericLabel: the label with the largest trilinear weight among the 8
    surrounding voxels, values and dtype kept)."""

    linear = "linear"
    nearest = "nearest"
    label = "label"


class ExportTarget(Choice):
    """Runtime an ONNX export is checked for."""

    tensorrt = "tensorrt"
    onnxruntime = "onnxruntime"


class ExportOutputs(Choice):
    """Outputs of an exported graph."""

    flow = "flow"
    flow_warped = "flow,warped"


class Similarity(str, Enum):
    """Image similarity of the refinement: ``ncc`` (the training loss, same contrast), ``ngf`` (normalised
    gradient fields, across contrasts), ``mind`` (MIND-SSC) or ``auto`` (NCC or NGF by
    :func:`emorph_deploy.contrast.contrast_agreement`)."""

    ncc = "ncc"
    mind = "mind"
    ngf = "ngf"
    auto = "auto"

    @classmethod
    def coerce(cls, value: str | Similarity) -> Similarity:
        try:
            return cls(value)
        except ValueError:
            choices = ", ".join(m.value for m in cls)
            raise InputError(
                f"refine similarity: expected one of {choices}, got {value!r}; fix: pass e.g. "
                "similarity='auto'"
            ) from None
