"""One nightly rebuild: ingest new inputs, refresh statistics, train, evaluate, gate, embed, publish.

Every step of an attempt (``RUNS/work/<attempt>/``) writes a done marker when finished, so a killed or failed
run is resumed by running it again: downloads are renamed into place when complete, the append is recorded in
the store's ledger only once its data are committed (a half-done append is rolled back by the next append),
training resumes from its checkpoint, embedding from its committed regions, and publishing finishes a version
folder (renamed into place in one step) before it moves ``latest``. Until then the previous ``latest`` and its
version folder are never touched.

The held-out cells are never trained on (:mod:`scvi_scale.rebuild.heldout`); the gate runs before the store's
embedding is rewritten, so a refused model never reaches the store.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from scvi_scale.config import config_from_dict
from scvi_scale.rebuild import heldout as ho
from scvi_scale.rebuild.config import RebuildConfig, load_rebuild_config
from scvi_scale.rebuild.sources import Source, download, list_sources
from scvi_scale.rebuild.versions import RunRoot, Steps, read_json, write_json
from scvi_scale.store.errors import InputError
from scvi_scale.store.zarr_store import utc_now

__all__ = ["FAULT_ENV", "LEDGER", "RebuildResult", "rebuild"]

log = logging.getLogger("scvi_scale.rebuild")

LEDGER = "rebuild_ingested"  # the store metadata entry listing the inputs the rebuild has appended
FAULT_ENV = "SCVI_SCALE_REBUILD_FAULT"


def _fault_point(step: str) -> None:
    """Tests kill the process here: ``SCVI_SCALE_REBUILD_FAULT=<step>`` (``appended``, ``trained``, ...)."""
    if os.environ.get(FAULT_ENV) == step:
        os.kill(os.getpid(), signal.SIGKILL)


@dataclass
class RebuildResult:
    """What a rebuild did: ``published`` a version, was ``refused`` by the gate, or had ``nothing`` to do."""

    status: Literal["published", "refused", "nothing"]
    message: str
    version: str | None = None
    path: Path | None = None
    attempt: str | None = None
    new_inputs: int = 0
    mode: str | None = None
    quality: dict[str, float] = field(default_factory=dict)
    gate: dict[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:
        shown = [f"{k}={v:.4g}" for k, v in self.quality.items() if k in _SHOWN and v is not None]
        return f"RebuildResult({self.status}: {self.message}{'; ' if shown else ''}{', '.join(shown)})"


_SHOWN = ("heldout/neg_elbo", "integration/total")


# ---- the ledger of ingested inputs (in the store's metadata) ----


def _raw_meta(store: str) -> dict[str, Any] | None:
    """The store's scvi-scale metadata, read even when the store is mid-append; None when there is no store."""
    import zarr

    if not Path(store).is_dir():
        return None
    return dict(zarr.open_group(store, mode="r").attrs.get("scvi_scale", {}))


def _ingested(meta: dict[str, Any] | None, sources: list[Source]) -> dict[str, dict[str, Any]]:
    """Ingested inputs by id: the ledger, plus local inputs the store's provenance names (converted by hand)."""
    if meta is None:
        return {}
    done = {r["id"]: r for r in meta.get(LEDGER, [])}
    by_path = {(p.get("path"), p.get("size_bytes")): p for p in meta.get("provenance", [])}
    paths = {p.get("path") for p in meta.get("provenance", [])}
    for s in sources:
        if s.id in done or s.remote:
            continue
        # a folder (10x mtx, AnnData .zarr) is recorded with the size of its matrix file, not of the whole folder
        where = str(Path(s.name).resolve())  # provenance records resolved paths
        if (s.name, s.size) in by_path or (where, s.size) in by_path or (Path(where).is_dir() and where in paths):
            done[s.id] = {**s.record(), "adopted": True}
    return done


# ---- planning ----


def _previous(root: RunRoot) -> tuple[str | None, dict[str, Any] | None]:
    pointer = root.latest()
    return (pointer["version"], root.manifest(pointer["version"])) if pointer else (None, None)


def _mode(cfg: RebuildConfig, prev: dict[str, Any] | None) -> tuple[str, str]:
    """``("warm" | "full", why)``."""
    policy = cfg.policy
    if prev is None:
        return "full", "first version"
    if policy.full_retrain or not policy.warm_start:
        return "full", "policy: full retrain"
    if policy.full_retrain_every and prev.get("warm_streak", 0) + 1 >= policy.full_retrain_every:
        return "full", f"policy: a full retrain every {policy.full_retrain_every} versions"
    if prev["config"]["train"]["model"] != cfg.train.model.__dict__:
        return "full", "the model section changed since the last version"
    if prev["config"].get("policy", {}).get("batch_key") != policy.batch_key:  # surgery maps batches by name
        return "full", "policy.batch_key changed since the last version"
    return "warm", f"warm start from {prev['version']}"


_HELDOUT_SETTINGS = ("holdout_fraction", "holdout_file", "cell_id_key", "max_eval_cells")


def _heldout_changed(cfg: RebuildConfig, prev: dict[str, Any]) -> list[str]:
    """The settings that choose the evaluation cells and differ from the previous version's (then its numbers
    were measured on other cells and cannot gate this one)."""
    then = prev["config"].get("policy", {})
    return [k for k in _HELDOUT_SETTINGS if then.get(k) != getattr(cfg.policy, k)]


def _plan(cfg: RebuildConfig, root: RunRoot, new: list[Source]) -> dict[str, Any]:
    base, prev = _previous(root)
    mode, why = _mode(cfg, prev)
    meta = _raw_meta(cfg.store)
    return {
        "version": root.next_version(),
        "created": utc_now(),
        "inputs": [{**s.record(), "files": list(s.files)} for s in new],
        "base": base,
        "mode": mode,
        "mode_reason": why,
        "store_before": {
            "exists": meta is not None,
            "n_provenance": len(meta.get("provenance", [])) if meta else 0,
        },
    }


# ---- the steps ----


def _ingest(cfg: RebuildConfig, folder: Path, state: dict[str, Any], progress: bool) -> dict[str, Any]:
    from scvi_scale.store.convert import append, convert
    from scvi_scale.store.zarr_store import ZarrStore

    sources = [Source(i["name"], i["size"], i["fingerprint"], tuple(i["files"])) for i in state["inputs"]]
    before, k = state["store_before"], len(sources)
    meta = _raw_meta(cfg.store)
    ledger_ids = {r["id"] for r in (meta or {}).get(LEDGER, [])}
    n_prov = len((meta or {}).get("provenance", []))
    if all(s.id in ledger_ids for s in sources):
        return {"n_obs": ZarrStore(cfg.store).n_obs}  # recorded before a kill: nothing left to do
    committed = meta is not None and bool(meta.get("complete")) and n_prov == before["n_provenance"] + k
    if not committed:
        if (meta is None) == before["exists"] or (meta is not None and n_prov != before["n_provenance"]):
            raise InputError(
                f"{cfg.store}: the store changed outside this rebuild since attempt {folder.name} began; "
                f"move {folder} away to start over"
            )
        ing = cfg.ingest
        opts = dict(
            batch_key=cfg.policy.batch_key, batch_per_file=ing.batch_per_file, layer=ing.layer,
            memory_budget_bytes=ing.memory_mb << 20, progress=progress, drop_empty_cells=ing.drop_empty_cells,
            var_names=ing.var_names,
        )  # fmt: skip
        try:  # a download that fails (or finds the object changed) closes the attempt too: the next run re-plans
            paths = [download(s, folder / "downloads" / s.id) if s.remote else Path(s.name) for s in sources]
            if meta is None:
                convert(paths, cfg.store, genes=ing.genes, **opts)
            else:
                append(cfg.store, paths, **opts)
        except InputError as err:
            _roll_back(cfg.store)
            _close(folder, "failed", f"an input could not be ingested ({err}); fix or remove it and rerun")
            raise
        _fault_point("appended")
        meta = _raw_meta(cfg.store)
    provenance = meta["provenance"][before["n_provenance"] :]
    records = [
        {**s.record(), "rows": p["rows"], "attempt": folder.name, "ingested": utc_now()}
        for s, p in zip(sources, provenance, strict=True)
    ]
    store = ZarrStore(cfg.store)
    store.update_metadata(LEDGER, [*meta.get(LEDGER, []), *records])
    shutil.rmtree(folder / "downloads", ignore_errors=True)
    log.info("ingested %d inputs into %s: now %d cells", k, cfg.store, store.n_obs)
    return {"n_obs": store.n_obs}


def _roll_back(store: str) -> None:
    """Undo an append that stopped on a bad input, so the store (and the latest version's embedding) stays readable."""
    import zarr

    from scvi_scale.store.zarr_store import set_complete, truncate

    meta = _raw_meta(store)
    if meta and not meta.get("complete") and meta.get("append_pending"):
        root = zarr.open_group(store, mode="r+")
        truncate(root, int(meta["append_pending"]["n_obs"]), int(meta["append_pending"]["nnz"]))
        set_complete(root, True, append_pending=None)
        log.warning("%s: rolled back the failed append", store)


def _prepare(cfg: RebuildConfig, progress: bool) -> dict[str, Any]:
    from scvi_scale import api
    from scvi_scale.store.zarr_store import ZarrStore

    store = ZarrStore(cfg.store)
    if cfg.prepare.n_top_genes is None:
        return {}
    result = api.prepare(
        store, min(cfg.prepare.n_top_genes, store.n_vars), cfg.policy.batch_key, progress=progress,
        num_workers=cfg.prepare.num_workers,
    )  # fmt: skip
    return {"n_hvg": int(result.hvg_index.size)}


def _heldout(cfg: RebuildConfig, store: Any) -> tuple[np.ndarray, np.ndarray]:
    p = cfg.policy
    return ho.heldout_mask(store, p.holdout_fraction, p.holdout_file, p.cell_id_key)


def _train_config(cfg: RebuildConfig, mode: str, progress: bool) -> Any:
    tree = cfg.train.to_dict()
    tree["data"]["batch_key"] = cfg.policy.batch_key
    if cfg.prepare.n_top_genes is None:
        tree["data"]["genes"] = "all"
    tree["train"]["progress"] = progress
    if mode == "warm":  # the model is trained already: no KL warm-up again
        tree["train"].update(n_epochs_kl_warmup=None, n_steps_kl_warmup=None)
        if cfg.policy.warm_epochs is not None:
            tree["train"]["max_epochs"] = cfg.policy.warm_epochs
    return config_from_dict(tree)


def _train(cfg: RebuildConfig, root: RunRoot, folder: Path, state: dict[str, Any], device: str, progress: bool) -> dict:
    from scvi_scale import api
    from scvi_scale.store.zarr_store import ZarrStore

    run_dir = folder / "run"
    if (run_dir / "model.pt").is_file():
        return {"run": str(run_dir)}
    store = ZarrStore(cfg.store)
    mask, _ = _heldout(cfg, store)
    base = root.versions / state["base"] if state["base"] else None
    warm = state["mode"] == "warm"
    keep_genes = base is not None and (warm or not cfg.policy.reselect_genes)
    start = {
        "init_from": base if keep_genes else None,
        "init_weights": warm,
        "exclude_rows": ho.heldout_rows(mask),
        # launched workers (Ray, several processes) take a GPU where they have one, unless the config says
        "device": cfg.device if cfg.train.train.workers > 1 or cfg.train.train.launcher == "ray" else device,
    }
    if (run_dir / "checkpoints" / "last.pt").is_file():
        log.info("resuming training from %s", run_dir / "checkpoints" / "last.pt")
        api.train(cfg.store, None, resume=run_dir, **start)
    else:
        api.train(cfg.store, run_dir, _train_config(cfg, state["mode"], progress), overwrite=True, **start)
    _fault_point("trained")
    return {"run": str(run_dir), "n_heldout": int(mask.sum())}


def _quality(run: Any, store: Any, rows: np.ndarray, cfg: RebuildConfig, device: str) -> dict[str, float]:
    from scvi_scale.report.quality import quality_numbers

    p = cfg.policy
    data = ho.eval_data(store, rows)
    return quality_numbers(
        run, data, batch_key=p.batch_key, labels_key=p.labels_key, max_cells=p.max_eval_cells, seed=p.seed,
        heldout="all", device=device, use_scib=p.scib,
    )  # fmt: skip


def _number(numbers: dict[str, Any], key: str) -> float:
    value = numbers.get(key)
    return math.nan if value is None else float(value)  # null in JSON: not computable


def _gate(new: dict[str, float], old: dict[str, float], cfg: RebuildConfig, same_genes: bool) -> tuple[bool, list[str]]:
    """Whether to publish, and why (each check in words with its numbers)."""
    p, reasons, ok = cfg.policy, [], True
    e_new, e_old = _number(new, "heldout/neg_elbo"), _number(old, "heldout/neg_elbo")
    if not math.isfinite(e_new) and math.isfinite(e_old):  # the new model diverged on cells the old one scored
        ok = False
        reasons.append(f"heldout/neg_elbo is not finite ({e_new}) where the previous version's was {e_old:.4g}")
    elif not math.isfinite(e_new):
        reasons.append("heldout/neg_elbo not compared: no held-out cells scored on either side")
    elif not same_genes:
        reasons.append("held-out ELBO not compared: the genes changed (policy.reselect_genes)")
    elif not math.isfinite(e_old):
        reasons.append(f"heldout/neg_elbo not compared: the previous version's is not finite ({e_old})")
    else:
        worse = (e_new - e_old) / abs(e_old)
        passed = worse <= p.max_elbo_worsening
        ok &= passed
        reasons.append(
            f"heldout/neg_elbo {e_new:.4g} vs {e_old:.4g} ({worse:+.2%}; allowed {p.max_elbo_worsening:+.2%}): "
            f"{'ok' if passed else 'worse'}"
        )
    i_new, i_old = _number(new, "integration/total"), _number(old, "integration/total")
    scib = "integration/uses_scib_metrics"
    if new.get(scib) != old.get(scib):
        reasons.append("integration/total not compared: the previous version was scored with other metrics (scib)")
    elif math.isfinite(i_new) and math.isfinite(i_old):
        passed = i_old - i_new <= p.max_integration_drop
        ok &= passed
        reasons.append(
            f"integration/total {i_new:.4f} vs {i_old:.4f} (drop {i_old - i_new:+.4f}; allowed "
            f"{p.max_integration_drop:.4f}): {'ok' if passed else 'worse'}"
        )
    else:
        reasons.append("integration/total not compared (not computable on these cells)")
    return ok, reasons


def _evaluate(cfg: RebuildConfig, root: RunRoot, folder: Path, state: dict[str, Any], device: str) -> dict:
    from scvi_scale import api
    from scvi_scale.store.zarr_store import ZarrStore

    store = ZarrStore(cfg.store)
    run = api.load_run(folder / "run")
    mask, hashes = _heldout(cfg, store)
    rows = ho.eval_rows(mask, hashes, store.n_obs, cfg.policy.max_eval_cells)
    numbers = _quality(run, store, rows, cfg, device)
    result: dict[str, Any] = {"quality": numbers, "eval_cells": int(rows.size), "n_heldout": int(mask.sum())}
    if state["base"] is None:
        e = _number(numbers, "heldout/neg_elbo")
        if rows.size and not math.isfinite(e):  # nothing to compare with, but a diverged model is never published
            result.update(publish=False, reasons=[f"first version: heldout/neg_elbo is not finite ({e})"])
        else:
            result.update(publish=True, reasons=["first version: no gate"])
        return result
    prev = root.manifest(state["base"])
    changed = _heldout_changed(cfg, prev)
    if changed:  # only a diverged model is refused
        e = _number(numbers, "heldout/neg_elbo")
        finite = not rows.size or math.isfinite(e)
        why = f"not compared with {state['base']}: the held-out settings changed ({', '.join(changed)})"
        result.update(publish=finite, reasons=[why if finite else f"heldout/neg_elbo is not finite ({e})"])
        return result
    prev_rows = ho.eval_rows(mask, hashes, int(prev["store"]["n_obs"]), cfg.policy.max_eval_cells)
    on_prev = _quality(run, store, prev_rows, cfg, device)
    same_genes = api.load_run(root.versions / state["base"]).var_names == run.var_names
    ok, reasons = _gate(on_prev, prev["quality"], cfg, same_genes)
    result.update(publish=ok, reasons=reasons, on_previous_set=on_prev, previous=prev["quality"])
    return result


def _embed(cfg: RebuildConfig, folder: Path, device: str, progress: bool) -> dict[str, Any]:
    from scvi_scale import api

    p = cfg.policy
    summary = api.embed_to_store(
        folder / "run", cfg.store, p.embed_outputs.split(","), p.embed_launcher, p.embed_workers, device=device,
        address=cfg.train.train.address, progress=progress,
    )  # fmt: skip
    _fault_point("embedded")
    return {"model_hash": summary.model_hash, "keys": list(summary.keys), "n_obs": summary.n_obs}


def _close(folder: Path, status: str, message: str, **extra: Any) -> None:
    write_json(folder / "result.json", {"status": status, "message": message, "finished": utc_now(), **extra})


# ---- the entry point ----


def rebuild(config_or_path: RebuildConfig | str | os.PathLike[str], *, progress: bool = False) -> RebuildResult:
    """Run (or resume) one nightly rebuild; see the module docstring and ``deploy/atlas.example.yaml``.

    Parameters
    ----------
    config_or_path
        A :class:`~scvi_scale.rebuild.config.RebuildConfig` or the path of its YAML file.
    progress
        Progress bars for conversion, preparation, training and embedding.

    Returns
    -------
    RebuildResult
        ``published`` (the new version), ``refused`` (the gate's numbers; ``latest`` unchanged) or ``nothing``.

    Examples
    --------
    >>> rebuild("atlas.yaml")  # doctest: +SKIP
    RebuildResult(published: v0003 (warm start from v0002; 2 new inputs, 31200 cells), ...)
    """
    cfg = config_or_path if isinstance(config_or_path, RebuildConfig) else load_rebuild_config(config_or_path)
    root = RunRoot(cfg.runs)
    with root.locked():
        folder = root.open_attempt()
        if folder is None:
            sources = list_sources(cfg.inputs)
            done = _ingested(_raw_meta(cfg.store), sources)
            new = [s for s in sources if s.id not in done]
            changed = [s.name for s in sources if s.id in done and done[s.id].get("fingerprint") not in
                       (None, s.fingerprint) and not done[s.id].get("adopted")]  # fmt: skip
            for name in changed:
                log.warning("%s changed since it was ingested; the store keeps the cells ingested then", name)
            last = root.last_result()
            first = (
                root.latest() is None and _raw_meta(cfg.store) is not None and (last or {}).get("status") != "refused"
            )
            if not new and not first:  # (a store made by hand, whose inputs are all in it, still gets a model)
                latest = root.latest()
                msg = f"no new inputs among {len(sources)}; latest is {latest['version'] if latest else 'none yet'}"
                if last and last["status"] == "refused":
                    msg += f" (the last attempt was refused by the gate: {last['message']})"
                log.info("nothing to do: %s", msg)
                return RebuildResult("nothing", msg)
            folder = root.new_attempt(_plan(cfg, root, new))
            log.info("attempt %s: %d new inputs", folder.name, len(new))
        else:
            log.info("resuming attempt %s", folder.name)
        return _run_attempt(cfg, root, folder, progress)


def _run_attempt(cfg: RebuildConfig, root: RunRoot, folder: Path, progress: bool) -> RebuildResult:
    import torch

    state = read_json(folder / "state.json")
    steps = Steps(folder)
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    version, n_new = state["version"], len(state["inputs"])
    ingest = steps.done("ingest") or steps.mark("ingest", _ingest(cfg, folder, state, progress))
    steps.done("prepare") or steps.mark("prepare", _prepare(cfg, progress))
    steps.done("train") or steps.mark("train", _train(cfg, root, folder, state, device, progress))
    ev = steps.done("evaluate") or steps.mark("evaluate", _evaluate(cfg, root, folder, state, device))
    common = dict(attempt=folder.name, new_inputs=n_new, mode=state["mode"], quality=ev["quality"])
    if not ev["publish"]:
        msg = f"{version} refused by the quality gate; latest stays {state['base']}: " + "; ".join(ev["reasons"])
        _close(folder, "refused", msg, gate=ev)
        log.warning("%s", msg)
        return RebuildResult("refused", msg, gate=ev, **common)
    emb = steps.done("embed") or steps.mark("embed", _embed(cfg, folder, device, progress))
    prev = root.manifest(state["base"]) if state["base"] else None
    manifest = {
        "version": version,
        "created": utc_now(),
        "attempt": folder.name,
        "mode": state["mode"],
        "mode_reason": state["mode_reason"],
        "parent": state["base"],
        "warm_streak": (prev.get("warm_streak", 0) + 1) if state["mode"] == "warm" and prev else 0,
        "inputs": state["inputs"],
        "store": {"path": cfg.store, "n_obs": ingest["n_obs"]},
        "heldout": {
            "fraction": cfg.policy.holdout_fraction,
            "file": cfg.policy.holdout_file,
            "cell_id_key": cfg.policy.cell_id_key,
            "n_heldout": ev["n_heldout"],
            "eval_cells": ev["eval_cells"],
        },
        "quality": ev["quality"],
        "gate": {k: ev[k] for k in ("reasons", "on_previous_set", "previous") if k in ev},
        "model_hash": emb["model_hash"],
        "embedding": emb,
        "config": cfg.to_dict(),
    }
    final = root.publish(version, folder / "run", manifest)
    msg = f"{version} ({state['mode_reason']}; {n_new} new inputs, {ingest['n_obs']} cells)"
    _close(folder, "published", msg, version=version)
    shutil.rmtree(folder / "run" / "checkpoints", ignore_errors=True)  # the version folder has the model
    log.info("published %s", msg)
    return RebuildResult("published", msg, version=version, path=final, gate=ev, **common)
