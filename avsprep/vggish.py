"""The VGGish network with local weights in the public PyTorch port's layout (`reference/vggish_keys.tsv`).

Kept apart from `avsprep.audio` so that the weight-free default path never imports torch (a second or two at
every start of `avsprep crops`).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from avsprep.embedding import EMBEDDING_DIM, check_examples
from avsprep.errors import InputError

log = logging.getLogger(__name__)


_VGG_CONFIG: tuple[int | str, ...] = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M")


class VGGish(nn.Module):
    """The VGGish network in the state-dict layout of the public PyTorch port (``reference/vggish_keys.tsv``).

    ``features``: 3×3 conv + ReLU blocks 64, M, 128, M, 256, 256, M, 512, 512, M on [B, 1, 96, 64] → [B, 512, 6, 4];
    the map is flattened channels-last ([B, 6, 4, 512], as the TensorFlow original) → 12288;
    ``embeddings``: 12288 → 4096 → 4096 → 128, each Linear followed by ReLU, the last one too.
    """

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_channels = 1
        for item in _VGG_CONFIG:
            if item == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [nn.Conv2d(in_channels, int(item), kernel_size=3, padding=1), nn.ReLU(inplace=True)]
                in_channels = int(item)
        self.features = nn.Sequential(*layers)
        self.embeddings = nn.Sequential(
            nn.Linear(512 * 6 * 4, 4096),
            nn.ReLU(inplace=True),
            nn.Linear(4096, 4096),
            nn.ReLU(inplace=True),
            nn.Linear(4096, EMBEDDING_DIM),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, 96, 64] or [B, 1, 96, 64] log-mel → [B, 128] post-ReLU embeddings."""
        if x.dim() == 3:
            x = x.unsqueeze(1)
        x = self.features(x)  # [B, 512, 6, 4]
        x = x.permute(0, 2, 3, 1).reshape(x.shape[0], -1)  # channels last, so the weights of the TF original fit
        return self.embeddings(x)


def _expected_vggish_shapes() -> dict[str, tuple[int, ...]]:
    # A meta-device model gives the layout without allocating or initialising its 72 M parameters.
    with torch.device("meta"):
        model = VGGish()
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}


def _numpy_safe_globals() -> list[Any]:
    """Globals that a pickled NumPy array needs. The public VGGish PCA file stores NumPy arrays, not tensors;
    these let ``torch.load(weights_only=True)`` read it without allowing arbitrary code. Pickles written by
    NumPy 1.x name the reconstructor ``numpy.core...``, NumPy 2.x ``numpy._core...``: allow both spellings."""
    try:
        from numpy._core.multiarray import _reconstruct  # NumPy >= 2
    except ImportError:  # pragma: no cover - NumPy 1.x
        from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]
    float_dtype_classes = [type(np.dtype(t)) for t in (np.float16, np.float32, np.float64)]
    return [
        (_reconstruct, "numpy.core.multiarray._reconstruct"),
        (_reconstruct, "numpy._core.multiarray._reconstruct"),
        np.ndarray,
        np.dtype,
        *float_dtype_classes,
    ]


def _describe_load_error(exc: Exception) -> str:
    """One line for a failed torch.load: torch's weights-only refusals are paragraphs; keep the reason."""
    text = str(exc)
    marker = "WeightsUnpickler error:"
    if marker in text:
        reason = next((line.strip() for line in text.split(marker, 1)[1].splitlines() if line.strip()), "")
        return f"not a plain tensor file, refused by the weights-only loader: {reason.split('. ')[0].rstrip('.')}"
    return next((line.strip() for line in text.splitlines() if line.strip()), type(exc).__name__)


def _load_tensor_dict(path: Path, what: str) -> dict[str, torch.Tensor]:
    """Load a flat {name: tensor or float array} file with ``weights_only=True``; values become float32 tensors."""
    if not path.is_file():
        raise InputError(path, f"{what} file not found")
    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError, ... for bad files
        raise InputError(path, f"cannot load {what} ({_describe_load_error(exc)})") from exc
    if not isinstance(obj, dict):
        raise InputError(path, f"{what} file holds a {type(obj).__name__}, expected a dict of tensors")
    tensors: dict[str, torch.Tensor] = {}
    for key, value in obj.items():
        if isinstance(value, np.ndarray) and value.dtype.kind == "f":
            value = torch.from_numpy(value)
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            raise InputError(path, f"{what} entry {key!r} is not a float tensor")
        tensors[str(key)] = value.to(torch.float32)
    return tensors


def load_vggish_state(path: str | Path) -> dict[str, torch.Tensor]:
    """Read and check a VGGish state dict (vggish_keys.tsv layout); InputError names the first bad key."""
    path = Path(path)
    state = _load_tensor_dict(path, "VGGish weights")
    expected = _expected_vggish_shapes()
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            more = f" (+{len(missing) - 1} more)" if len(missing) > 1 else ""
            parts.append(f"missing key {missing[0]!r}{more}")
        if unexpected:
            more = f" (+{len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
            parts.append(f"unexpected key {unexpected[0]!r}{more}")
        raise InputError(path, "not a VGGish state dict: " + ", ".join(parts))
    for key, shape in expected.items():
        if tuple(state[key].shape) != shape:
            raise InputError(path, f"VGGish key {key!r} has shape {tuple(state[key].shape)}, expected {shape}")
    return state


def load_vggish_pca(path: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Read a VGGish PCA file: ``pca_eigen_vectors`` [128, 128] and ``pca_means`` [128] (or [128, 1])."""
    path = Path(path)
    params = _load_tensor_dict(path, "VGGish PCA")
    for key in ("pca_eigen_vectors", "pca_means"):
        if key not in params:
            raise InputError(path, f"VGGish PCA file lacks key {key!r}")
    vectors, means = params["pca_eigen_vectors"], params["pca_means"]
    if tuple(vectors.shape) != (EMBEDDING_DIM, EMBEDDING_DIM):
        raise InputError(path, f"'pca_eigen_vectors' has shape {tuple(vectors.shape)}, "
                               f"expected ({EMBEDDING_DIM}, {EMBEDDING_DIM})")
    if means.numel() != EMBEDDING_DIM or means.dim() > 2:
        raise InputError(path, f"'pca_means' has shape {tuple(means.shape)}, expected ({EMBEDDING_DIM},)")
    return vectors, means.reshape(EMBEDDING_DIM)


# VGGish post-processing: PCA, clip to [-2, 2], quantise to 8 bits (vggish_params QUANTIZE_MIN/MAX_VAL).
_QUANTIZE_MIN, _QUANTIZE_MAX = -2.0, 2.0


def pca_postprocess(embeddings: torch.Tensor, vectors: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
    """[n, 128] raw embeddings → [n, 128] float32 holding the quantised integers 0..255 of the reference
    Postprocessor: round((clamp(E (x - mean), -2, 2) + 2) · 255 / 4)."""
    projected = (embeddings - means) @ vectors.T  # row-wise E (x - mean)
    clipped = projected.clamp(_QUANTIZE_MIN, _QUANTIZE_MAX)
    return torch.round((clipped - _QUANTIZE_MIN) * (255.0 / (_QUANTIZE_MAX - _QUANTIZE_MIN)))


class VGGishEmbedder:
    """VGGish embeddings [n, 128] float32 from local weights (never downloaded).

    Construction only checks that the files exist, so it is cheap and the object pickles small (the network is
    not pickled); the weights are loaded and checked on the first ``embed`` or an explicit ``load()`` — call
    ``load()`` early to fail fast on a bad file. Output is the raw post-ReLU embedding unless ``pca_path`` is
    given, in which case it is the PCA-quantised 0..255 values of the reference post-processor.
    """

    name = "vggish"

    def __init__(
        self,
        weights_path: str | Path,
        pca_path: str | Path | None = None,
        device: str | torch.device = "cpu",
        batch_size: int = 64,
    ) -> None:
        self.weights_path = Path(weights_path)
        self.pca_path = None if pca_path is None else Path(pca_path)
        self.device = torch.device(device)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        for file, what in ((self.weights_path, "VGGish weights"), (self.pca_path, "VGGish PCA")):
            if file is not None and not file.is_file():
                raise InputError(file, f"{what} file not found")
        self._model: VGGish | None = None
        self._pca: tuple[torch.Tensor, torch.Tensor] | None = None

    def __getstate__(self) -> dict[str, Any]:
        # Worker processes reload the weights themselves rather than receiving 290 MB through a pipe.
        state = self.__dict__.copy()
        state["_model"] = None
        state["_pca"] = None
        return state

    def load(self) -> VGGish:
        """Load (once) and return the network; InputError for a missing or malformed weights/PCA file."""
        if self._model is None:
            state = load_vggish_state(self.weights_path)
            with torch.device("meta"):
                model = VGGish()
            model.load_state_dict(state, assign=True)  # takes the loaded tensors as they are: no second copy
            self._model = model.to(self.device).eval()
            if self.pca_path is not None:
                vectors, means = load_vggish_pca(self.pca_path)
                self._pca = (vectors.to(self.device), means.to(self.device))
            log.debug("loaded VGGish weights from %s", self.weights_path)
        return self._model

    @torch.inference_mode()
    def embed(self, examples: np.ndarray) -> np.ndarray:
        """examples [n, 96, 64] → [n, 128] float32, computed in batches of ``batch_size``."""
        examples = check_examples(examples)
        model = self.load()
        outputs = []
        for start in range(0, examples.shape[0], self.batch_size):
            batch = torch.as_tensor(examples[start : start + self.batch_size], dtype=torch.float32, device=self.device)
            embedding = model(batch)
            if self._pca is not None:
                embedding = pca_postprocess(embedding, *self._pca)
            outputs.append(embedding.float().cpu().numpy())
        if not outputs:
            return np.zeros((0, EMBEDDING_DIM), dtype=np.float32)
        return np.concatenate(outputs, axis=0)
