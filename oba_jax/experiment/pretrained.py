"""Pretrained ImageNet weights into the zoo: torchvision / timm state dicts → a `train.py`-style workdir.

    python -m oba_jax.experiment.pretrained --family resnet50|vit --weights FILE --workdir DIR

`FILE` is the `.pth` torchvision downloads (`resnet50-0676ba61.pth` = IMAGENET1K_V1, `resnet50-11ad3fa6.pth`
= V2, `vit_b_16-c867db91.pth`) or a `.safetensors` with timm's names (`resnet50.tv_in1k`, whose names are
torchvision's, and `vit_base_patch16_224`). Afterwards `checkpoint.restore_model(DIR)` returns the zoo
model in eval mode computing what the torch model computes (on the same normalised images, NHWC instead of
NCHW), and `--config.prune.pretrained=DIR` prunes it.

Reading needs neither torch nor safetensors and executes nothing from the file: a `.pth` is a zip of one
pickle and raw storages, unpickled with a whitelist of the four globals a state dict uses (tensor rebuild,
storage types, `OrderedDict`); a `.safetensors` is a JSON header and raw bytes. The architecture (widths,
blocks, layers, classes, image size of a ViT) is read from the arrays' shapes, so narrow or shallow variants
import too; a ViT's head count is not in its shapes (`--num-heads`, default hidden width / 64 as every
torchvision and timm ViT).
"""
from __future__ import annotations

import argparse
import collections
import hashlib
import io
import json
import os
import pickle
import re
import struct
import sys
import types
import zipfile
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from models import build_model, spec_to_dict
from models.specs import ResNet50Spec, ViTSpec
from oba_jax import nnx_model
from oba_jax.experiment import checkpoint as ckpt_lib
from oba_jax.experiment.checkpoint import CheckpointMismatchError
from oba_jax.experiment.cli import run_cli
from oba_jax.experiment.config import ConfigError
from oba_jax.experiment.lock import workdir_lock
from oba_jax.experiment.training import TrainState
from oba_jax.paths import flat_by_path, unflatten_by_path

__all__ = ["FAMILIES", "WeightsFileError", "WeightsMismatchError", "convert", "import_weights", "main",
           "read_state_dict"]

PROVENANCE = "pretrained.json"


class WeightsFileError(ConfigError):
    """The weights file cannot be read: not a .pth / .safetensors, truncated, or a pickle with other globals."""


class WeightsMismatchError(CheckpointMismatchError):
    """The weights are not a state dict of the family asked for: missing, extra or misshaped keys."""


# ---------------------------------------------------------------------------------------------
# Reading: .pth (zip of pickles) and .safetensors, without torch


_TORCH_DTYPES = {"FloatStorage": "float32", "DoubleStorage": "float64", "HalfStorage": "float16",
                 "BFloat16Storage": "bfloat16", "LongStorage": "int64", "IntStorage": "int32",
                 "ShortStorage": "int16", "CharStorage": "int8", "ByteStorage": "uint8", "BoolStorage": "bool"}
_SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                       "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def _np_dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        import ml_dtypes   # a jax dependency
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def _rebuild_tensor(storage: np.ndarray, offset: int, size: Sequence[int], stride: Sequence[int], *_: Any) -> np.ndarray:
    itemsize = storage.dtype.itemsize
    needed = offset + 1 + sum((s - 1) * st for s, st in zip(size, stride)) if all(size) else offset
    if needed > storage.size:
        raise ValueError(f"a tensor of shape {tuple(size)} reaches past its storage of {storage.size} entries")
    view = np.lib.stride_tricks.as_strided(storage[offset:], shape=tuple(size),
                                           strides=tuple(st * itemsize for st in stride))
    return np.array(view)   # a contiguous copy: nothing refers to the zip's buffers afterwards


def _rebuild_parameter(data: np.ndarray, *_: Any) -> np.ndarray:
    return data


class _StateDictUnpickler(pickle.Unpickler):
    """Unpickles a torch state dict; refuses every global but the four a state dict is written with."""

    def __init__(self, data: bytes, storage: Callable[[str, str, int], np.ndarray]):
        super().__init__(io.BytesIO(data))
        self._storage = storage

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if (module, name) == ("torch._utils", "_rebuild_parameter"):
            return _rebuild_parameter
        if module == "torch" and name in _TORCH_DTYPES:
            return types.SimpleNamespace(dtype=_TORCH_DTYPES[name])
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a state dict (nothing in the file "
                                     "is executed: only tensors, storages and OrderedDict are read)")

    def persistent_load(self, pid: Any) -> np.ndarray:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unknown persistent id {str(pid)[:80]}")
        _, kind, key, _location, numel = pid
        return self._storage(str(key), kind.dtype, int(numel))


def _read_pth(path: str) -> dict[str, Any]:
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise WeightsFileError(f"{path}: not a zip archive, so not a torch ≥ 1.6 .pth (an old-format .pth: re-save "
                               "it with torch.save(torch.load(f), f); or give a .safetensors)") from None
    with archive:
        pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(pickles) != 1:
            raise WeightsFileError(f"{path}: a zip without one data.pkl ({len(pickles)} found): not a torch .pth")
        root = pickles[0][: -len("data.pkl")]
        cache: dict[str, np.ndarray] = {}

        def storage(key: str, dtype: str, numel: int) -> np.ndarray:
            if key not in cache:
                try:
                    raw = archive.read(f"{root}data/{key}")
                except KeyError:
                    raise WeightsFileError(f"{path}: storage {key} is missing from the archive") from None
                array = np.frombuffer(raw, _np_dtype(dtype))
                if array.size < numel:
                    raise WeightsFileError(f"{path}: storage {key} holds {array.size} entries, the pickle says {numel}")
                cache[key] = array
            return cache[key]
        try:
            loaded = _StateDictUnpickler(archive.read(pickles[0]), storage).load()
        except WeightsFileError:
            raise
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, zipfile.BadZipFile,
                OSError) as err:
            raise WeightsFileError(f"{path}: not a readable torch state dict ({type(err).__name__}: {err})") from None
    return loaded


def _read_safetensors(path: str) -> dict[str, Any]:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise WeightsFileError(f"{path}: {size} bytes, too short for a .safetensors header")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise WeightsFileError(f"{path}: the header says {n} bytes of JSON but the file has {size - 8} after "
                                   "the length (truncated?)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise WeightsFileError(f"{path}: the .safetensors header is not JSON ({err})") from None
        body = f.read()
    out: dict[str, Any] = {}
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype, shape, (lo, hi) = _np_dtype(_SAFETENSORS_DTYPES[entry["dtype"]]), entry["shape"], entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise WeightsFileError(f"{path}: tensor {key!r} has an unreadable header entry {str(entry)[:120]}") from None
        if hi > len(body) or hi - lo != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
            raise WeightsFileError(f"{path}: tensor {key!r} needs bytes {lo}..{hi} of {len(body)} (truncated?)")
        out[key] = np.frombuffer(body[lo:hi], dtype).reshape(shape).copy()
    return out


def read_state_dict(path: str) -> dict[str, np.ndarray]:
    """`{key: array}` of a torch `.pth` or a `.safetensors` file (told apart by their first bytes). A
    checkpoint that wraps its weights (`{"state_dict": …}`, `{"model": …}`) is unwrapped; a DataParallel
    `module.` prefix is dropped."""
    if not os.path.isfile(path):
        raise WeightsFileError(f"--weights {path!r} is not a file")
    with open(path, "rb") as f:
        magic = f.read(4)
    loaded = _read_pth(path) if magic.startswith(b"PK") else _read_safetensors(path)
    for wrapper in ("state_dict", "model"):
        if isinstance(loaded, dict) and isinstance(loaded.get(wrapper), dict) and len(loaded) <= 3:
            loaded = loaded[wrapper]
    if not isinstance(loaded, dict) or not all(isinstance(v, np.ndarray) for v in loaded.values()):
        raise WeightsFileError(f"{path}: holds a {type(loaded).__name__}, not a state dict of tensors")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in loaded.items()}


# ---------------------------------------------------------------------------------------------
# Converting: torchvision / timm names and layouts → the zoo's specs and arrays


def _need(sd: Mapping[str, np.ndarray], key: str, family: str, path: str) -> np.ndarray:
    if key not in sd:
        shown = ", ".join(sorted(sd)[:6])
        raise WeightsMismatchError(f"{path} is not a {family} state dict: it has no {key!r} (its keys begin "
                                   f"{shown}{', …' if len(sd) > 6 else ''})")
    return sd[key]


def _conv(w: np.ndarray) -> np.ndarray:
    return np.transpose(w, (2, 3, 1, 0))        # (O, I, kh, kw) → (kh, kw, I, O)


def _resnet50(sd: Mapping[str, np.ndarray], path: str, image_size: int | None, num_heads: int | None):
    stem = _need(sd, "conv1.weight", "resnet50", path)
    fc = _need(sd, "fc.weight", "resnet50", path)
    stages = sorted({int(m.group(1)) for k in sd if (m := re.match(r"layer(\d+)\.", k))})
    if stages != list(range(1, len(stages) + 1)) or not stages:
        raise WeightsMismatchError(f"{path} is not a resnet50 state dict: its stages are layer{stages} (expected "
                                   "layer1, layer2, …)")
    params = {"conv1/kernel": _conv(stem), "fc/kernel": fc.T, "fc/bias": _need(sd, "fc.bias", "resnet50", path)}
    stats: dict[str, np.ndarray] = {}
    used = ["conv1.weight", "fc.weight", "fc.bias"] + _bn_checked(sd, "bn1", "bn1", params, stats, path)
    stage_widths, blocks_per_stage, block_widths = [], [], []
    for s in stages:
        blocks = sorted({int(m.group(1)) for k in sd if (m := re.match(rf"layer{s}\.(\d+)\.", k))})
        pairs = []
        for b in blocks:
            src, dst = f"layer{s}.{b}", f"stages/{s - 1}/blocks/{b}"
            for k in (1, 2, 3):
                w = _need(sd, f"{src}.conv{k}.weight", "resnet50", path)
                params[f"{dst}/conv{k}/kernel"] = _conv(w)
                used += [f"{src}.conv{k}.weight"] + _bn_checked(sd, f"{src}.bn{k}", f"{dst}/bn{k}", params, stats, path)
            if b == blocks[0]:
                params[f"{dst}/downsample/conv/kernel"] = _conv(_need(sd, f"{src}.downsample.0.weight", "resnet50", path))
                used += [f"{src}.downsample.0.weight"] + _bn_checked(sd, f"{src}.downsample.1", f"{dst}/downsample/bn",
                                                                    params, stats, path)
            pairs.append((int(sd[f"{src}.conv1.weight"].shape[0]), int(sd[f"{src}.conv2.weight"].shape[0])))
        stage_widths.append(int(sd[f"layer{s}.{blocks[-1]}.conv3.weight"].shape[0]))
        blocks_per_stage.append(len(blocks))
        block_widths.append(tuple(pairs))
    spec = ResNet50Spec(stem_width=int(stem.shape[0]), stage_widths=tuple(stage_widths),
                        blocks_per_stage=tuple(blocks_per_stage), block_widths=tuple(block_widths),
                        num_classes=int(fc.shape[0]), in_channels=int(stem.shape[1]), image_size=image_size or 224)
    ignored = [k for k in sd if k.endswith("num_batches_tracked")]
    return spec, params, stats, set(used) | set(ignored), sd


def _bn_checked(sd: Mapping[str, np.ndarray], src: str, dst: str, params: dict, stats: dict, path: str) -> list[str]:
    """A torch BatchNorm2d's affine → params, running statistics → batch_stats; the keys it used."""
    get = lambda n: _need(sd, f"{src}.{n}", "resnet50", path)  # noqa: E731
    params[f"{dst}/scale"], params[f"{dst}/bias"] = get("weight"), get("bias")
    stats[f"{dst}/mean"], stats[f"{dst}/var"] = get("running_mean"), get("running_var")
    return [f"{src}.{n}" for n in ("weight", "bias", "running_mean", "running_var")]


# timm's ViT names → torchvision's (timm's resnet50.tv_in1k already uses torchvision's names)
_TIMM_VIT = ((r"^patch_embed\.proj\.", "conv_proj."), (r"^cls_token$", "class_token"),
             (r"^pos_embed$", "encoder.pos_embedding"), (r"^blocks\.(\d+)\.norm1\.", r"encoder.layers.encoder_layer_\1.ln_1."),
             (r"^blocks\.(\d+)\.attn\.qkv\.", r"encoder.layers.encoder_layer_\1.self_attention.in_proj_"),
             (r"^blocks\.(\d+)\.attn\.proj\.", r"encoder.layers.encoder_layer_\1.self_attention.out_proj."),
             (r"^blocks\.(\d+)\.norm2\.", r"encoder.layers.encoder_layer_\1.ln_2."),
             (r"^blocks\.(\d+)\.mlp\.fc1\.", r"encoder.layers.encoder_layer_\1.mlp.0."),
             (r"^blocks\.(\d+)\.mlp\.fc2\.", r"encoder.layers.encoder_layer_\1.mlp.3."),
             (r"^norm\.", "encoder.ln."), (r"^head\.", "heads.head."))


def _torchvision_vit_names(sd: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = {}
    for key, value in sd.items():
        new = key
        for pattern, repl in _TIMM_VIT:
            new = re.sub(pattern, repl, new)
        # torchvision ≤ 0.12 named the MLP's linears linear_1 / linear_2 (its loader renames them too)
        new = new.replace(".mlp.linear_1.", ".mlp.0.").replace(".mlp.linear_2.", ".mlp.3.")
        out[new] = value
    return out


def _vit(sd: Mapping[str, np.ndarray], path: str, image_size: int | None, num_heads: int | None):
    sd = _torchvision_vit_names(sd)
    need = lambda key: _need(sd, key, "vit", path)  # noqa: E731
    patch = need("conv_proj.weight")
    d, channels, p = int(patch.shape[0]), int(patch.shape[1]), int(patch.shape[2])
    pos = need("encoder.pos_embedding")
    side = int(round(np.sqrt(pos.shape[1] - 1)))
    if side * side != pos.shape[1] - 1:
        raise WeightsMismatchError(f"{path}: encoder.pos_embedding has {pos.shape[1]} positions, not 1 + a square "
                                   "number of patches")
    if image_size is not None and image_size != side * p:
        raise ConfigError(f"--image-size {image_size}: the weights' position embedding is for {side * p}×{side * p}")
    heads = num_heads or d // 64
    if heads < 1 or d % heads:
        raise ConfigError(f"--num-heads {heads} does not divide the hidden width {d}")
    layers = sorted({int(m.group(1)) for k in sd if (m := re.match(r"encoder\.layers\.encoder_layer_(\d+)\.", k))})
    params: dict[str, np.ndarray] = {"conv_proj/kernel": _conv(patch), "conv_proj/bias": need("conv_proj.bias"),
                                     "class_token": need("class_token"), "pos_embedding": pos,
                                     "ln/scale": need("encoder.ln.weight"), "ln/bias": need("encoder.ln.bias"),
                                     "head/kernel": need("heads.head.weight").T, "head/bias": need("heads.head.bias")}
    used = {"conv_proj.weight", "conv_proj.bias", "class_token", "encoder.pos_embedding", "encoder.ln.weight",
            "encoder.ln.bias", "heads.head.weight", "heads.head.bias"}
    mlp_dims = []
    for i in layers:
        src, dst = f"encoder.layers.encoder_layer_{i}", f"layers/{i}"
        names = {"ln_1.weight": "ln_1/scale", "ln_1.bias": "ln_1/bias", "ln_2.weight": "ln_2/scale",
                 "ln_2.bias": "ln_2/bias", "self_attention.out_proj.bias": "attention/out/bias",
                 "mlp.0.bias": "mlp_in/bias", "mlp.3.bias": "mlp_out/bias"}
        for s, t in names.items():
            params[f"{dst}/{t}"] = need(f"{src}.{s}")
        for s, t in (("self_attention.out_proj.weight", "attention/out/kernel"), ("mlp.0.weight", "mlp_in/kernel"),
                     ("mlp.3.weight", "mlp_out/kernel")):
            params[f"{dst}/{t}"] = need(f"{src}.{s}").T
        w, b = need(f"{src}.self_attention.in_proj_weight"), need(f"{src}.self_attention.in_proj_bias")
        if w.shape[0] != 3 * d:
            raise WeightsMismatchError(f"{path}: {src}.self_attention.in_proj_weight has shape {w.shape}, not "
                                       f"(3·{d}, {d})")
        for k, name in enumerate(("query", "key", "value")):
            params[f"{dst}/attention/{name}/kernel"] = w[k * d:(k + 1) * d].T
            params[f"{dst}/attention/{name}/bias"] = b[k * d:(k + 1) * d]
        used |= {f"{src}.{s}" for s in (*names, "self_attention.out_proj.weight", "mlp.0.weight", "mlp.3.weight",
                                        "self_attention.in_proj_weight", "self_attention.in_proj_bias")}
        mlp_dims.append(int(sd[f"{src}.mlp.0.weight"].shape[0]))
    spec = ViTSpec(image_size=side * p, patch_size=p, in_channels=channels, hidden_dim=d, num_layers=len(layers),
                   num_heads=(heads,) * len(layers), head_dim=(d // heads,) * len(layers), mlp_dim=tuple(mlp_dims),
                   num_classes=int(sd["heads.head.weight"].shape[0]))
    return spec, params, {}, used, sd


FAMILIES = {"resnet50": _resnet50, "vit": _vit}


def convert(state_dict: Mapping[str, np.ndarray], family: str, *, path: str = "<state dict>",
            image_size: int | None = None, num_heads: int | None = None):
    """`(model, spec)`: the zoo model (eval mode, float32) holding `state_dict`'s weights. Raises
    `WeightsMismatchError` naming the keys that are missing, extra or of another shape."""
    if family not in FAMILIES:
        raise ConfigError(f"--family {family!r}: choose one of {', '.join(FAMILIES)}")
    spec, params, stats, used, names = FAMILIES[family](state_dict, path, image_size, num_heads)
    extra = sorted(set(names) - used)
    if extra:
        raise WeightsMismatchError(f"{path}: {len(extra)} keys are not part of a {family} (e.g. {', '.join(extra[:8])}): "
                                   "a state dict of another architecture, or a head this importer does not know")
    model = nnx.eval_shape(lambda: build_model(spec, rngs=nnx.Rngs(0)))
    graphdef, state = nnx_model.split(model)
    filled = {}
    for kind, given, template in (("params", params, state.params), ("batch_stats", stats, state.batch_stats)):
        flat = flat_by_path(template)
        missing = sorted(set(flat) - set(given))
        if missing:   # (cannot happen for a spec read from the same keys; a guard against a converter bug)
            raise WeightsMismatchError(f"{path}: no weights for {kind} {missing[:8]}")
        for name, aval in flat.items():
            if tuple(given[name].shape) != tuple(aval.shape):
                raise WeightsMismatchError(f"{path}: {name} has shape {tuple(given[name].shape)}, the {family} read "
                                           f"from the file's other shapes needs {tuple(aval.shape)}")
        filled[kind] = unflatten_by_path(template, {k: jnp.asarray(np.asarray(given[k], np.float32)) for k in flat})
    model = nnx_model.merge(graphdef, state._replace(params=filled["params"], batch_stats=filled["batch_stats"]))
    model.eval()
    return model, spec


# ---------------------------------------------------------------------------------------------
# Writing the workdir


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def import_weights(family: str, weights: str, workdir: str, *, image_size: int | None = None,
                   num_heads: int | None = None) -> Any:
    """Reads `weights`, converts them to the zoo's `family` and writes `workdir` as a `train.py` run would
    (its checkpoint at step 0, no optimizer state) plus `pretrained.json` (the source file, its SHA-256,
    the spec). Refuses a workdir that already holds checkpoints. Returns the model (eval mode)."""
    if not workdir:
        raise ConfigError("--workdir is empty: name the directory to write the model into")
    model, spec = convert(read_state_dict(weights), family, path=weights, image_size=image_size,
                          num_heads=num_heads)
    os.makedirs(workdir, exist_ok=True)
    with workdir_lock(workdir):
        if os.path.isdir(ckpt_lib.checkpoint_dir(workdir)) and os.listdir(ckpt_lib.checkpoint_dir(workdir)):
            raise ConfigError(f"--workdir {workdir!r} already holds checkpoints: give a new directory")
        _, state = nnx_model.split(model)
        manager = ckpt_lib.make_manager(workdir)
        ckpt_lib.save_state(manager, 0, TrainState(step=jnp.zeros((), jnp.int32), params=state.params,
                                                   batch_stats=state.batch_stats, opt_state={}),
                            spec=spec, extra={"pretrained": {"family": family, "weights": os.path.abspath(weights)}})
        manager.wait_until_finished()
        manager.close()
        record = {"family": family, "weights": os.path.abspath(weights), "sha256": _sha256(weights),
                  "spec": spec_to_dict(spec)}
        tmp = os.path.join(workdir, PROVENANCE + ".tmp")
        with open(tmp, "w") as f:
            json.dump(record, f, indent=1)
        os.replace(tmp, os.path.join(workdir, PROVENANCE))
    return model


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m oba_jax.experiment.pretrained",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--family", required=True, choices=sorted(FAMILIES))
    parser.add_argument("--weights", required=True, help="a torchvision .pth or a timm .safetensors")
    parser.add_argument("--workdir", required=True, help="the directory to write (a train.py-style workdir)")
    parser.add_argument("--image-size", type=int, default=None,
                        help="ResNet-50: the input size the spec records (default 224); ViT: read from the weights")
    parser.add_argument("--num-heads", type=int, default=None, help="ViT: attention heads (default hidden width / 64)")
    args = parser.parse_args(argv)

    def body(session) -> int:
        model = import_weights(args.family, args.weights, args.workdir, image_size=args.image_size,
                               num_heads=args.num_heads)
        print(f"wrote {args.workdir}: {args.family} {model.spec} from {args.weights}")
        return 0
    return run_cli("pretrained", body, owns_process=__name__ == "__main__")


if __name__ == "__main__":
    sys.exit(main())
