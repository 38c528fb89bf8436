"""The streamed writer: materialise and save one decoder layer at a time, one shard per layer (then one per
remaining tensor: embeddings, norms, head).

The in-memory path saves a whole model with `output.io.save`; a streamed run never holds the model, so
each layer is read from the checkpoint, its units' bases read back from the run directory, materialised
at their ranks, written as its own safetensors shard and released before the next layer. The output
appears atomically, with its manifest, report and artefacts, or not at all.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from svdzip.core.checkpoint import StreamedWeights, placeholder
from svdzip.core.resume import RunState
from svdzip.errors import SvdzipError
from svdzip.methods.decompose import Unit
from svdzip.methods.linalg import Spectrum
from svdzip.recipe import Recipe

log = logging.getLogger(__name__)


@torch.no_grad()
def write_streamed(weights: StreamedWeights, units: list[Unit], ranks: list[int | None], state: RunState,
                   tokenizer: Any, out: Path, config: Recipe, save_dtype: torch.dtype | None,
                   summary_extra: dict[str, Any], artefacts: Callable[[Path, list[Any]], None] | None = None,
                   healer: Any = None) -> list[Any]:
    """Materialise and save one decoder layer at a time (one shard each), then the rest; atomically.

    `artefacts(tmp, rows)` writes plots and reports into the directory before it becomes `out`. With a
    `healer` (`recover.layerwise`) each layer is healed on the run's device before it is written.
    """
    from svdzip.engine.pipeline import materialise_layer, units_by_layer
    from svdzip.output import io

    model, adapter, reader = weights.model, weights.adapter, weights.reader
    params_before = sum(p.numel() for p in model.parameters())  # the skeleton's shapes: nothing is read
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        n = adapter.num_layers
        tied = getattr(model.config, "tie_word_embeddings", False)
        out_emb = model.get_output_embeddings()
        head_names = {f"{name}.weight" for name, mod in model.named_modules() if mod is out_emb} if tied else set()
        # the rest (embeddings, norms, head) a shard per tensor: one vocabulary-sized table is held at a time, not all
        # of them together with safetensors' serialised copy (Qwen2.5-1.5B: two 151,936 × 1,536 tables)
        rest_names = [name for name, _ in model.named_parameters()
                      if not name.startswith(adapter.spec.layers_path + ".") and name not in head_names]
        total_shards = n + len(rest_names)
        shard_names = [f"model-{i + 1:05d}-of-{total_shards:05d}.safetensors" for i in range(total_shards)]
        weight_map: dict[str, str] = {}
        rows = []
        bias: dict[str, bool] = {}
        by_layer = units_by_layer(units)
        device = healer.device if healer is not None else "cpu"
        log.info("writing %d decoder layers, one shard each, to %s", n, out)
        for index in tqdm(range(n), desc="healing and writing layers" if healer else "writing layers", unit="layer"):
            prefix = weights.prefix(index)
            with weights.layer(index, device) as layer:  # read for its turn, released after
                mine = by_layer.get(index, [])
                for u in mine:
                    if ranks[u] is not None:
                        restored = state.load_unit(u, units[u].name)
                        if restored is None:
                            raise SvdzipError(f"spectrum of {units[u].name} is missing or corrupted in "
                                              f"{state.root}; rerun the same command to recompute it")
                        units[u].spectrum = Spectrum(restored[0], restored[1])
                rows += materialise_layer(adapter, index, layer, units, ranks, mine, healer)
                for u in mine:
                    spec = units[u].spectrum
                    units[u].spectrum = Spectrum(spec.sigma2, placeholder(tuple(spec.basis.shape)))
                    for m in units[u].members:
                        mod = adapter.module(m.name)
                        if hasattr(mod, "left"):
                            bias[m.name] = mod.left.bias is not None
                tensors = {prefix + k: (v.to(save_dtype) if v.is_floating_point() and save_dtype else v).cpu()
                           for k, v in layer.state_dict().items()}
                save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / shard_names[index]),
                          metadata={"format": "pt"})
                weight_map.update(dict.fromkeys(tensors, shard_names[index]))
                del tensors
        log.info("writing the embeddings, norms and head")
        for shard, name in zip(shard_names[n:], rest_names, strict=True):
            value = reader.get(name)
            value = value.to(save_dtype) if save_dtype and value.is_floating_point() else value
            save_file({name: value}, str(tmp / shard), metadata={"format": "pt"})
            weight_map[name] = shard
            del value
        total = sum((tmp / s).stat().st_size for s in shard_names)
        (tmp / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        # the same keys as an in-memory run's summary, so that `svdzip info` reads either
        linear_before = adapter.decoder_linear_params()
        params_after = sum(p.numel() for p in model.parameters())
        summary = {"method": config.label, "ratio_requested": None if config.memory_budget else config.ratio,
                   "streamed": True, "decoder_linear_params_before": linear_before,
                   "model_params_before": params_before, "model_params_after": params_after,
                   "model_ratio_achieved": 1.0 - params_after / params_before,
                   "dense_modules": sum(1 for r in rows if r.rank is None), **summary_extra}
        manifest = io.build_manifest(rows, summary, config.to_dict())
        manifest.details["provenance"]["streamed"] = True
        if healer is not None:
            from svdzip.recover.directory import record_recovery

            record_recovery(manifest, healer.report())
        manifest.details["source_model"] = str(reader.dir)
        for name, entry in manifest.modules.items():
            entry["bias"] = bias.get(name, False)
        model.config.quantization_config = manifest
        try:
            if save_dtype is not None:
                model.config.dtype = save_dtype
            model.config.save_pretrained(tmp)
        finally:
            del model.config.quantization_config
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / "svdzip_report.json").write_text(json.dumps(
            {**manifest.details, "modules": [r.to_dict() for r in rows]}, indent=2, default=str))
        if artefacts is not None:
            artefacts(tmp, rows)
        from svdzip.output.checksums import write_checksums

        write_checksums(tmp)
        io.replace_dir(tmp, out)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        io.raise_write_error(exc, out)
        raise
    return rows
