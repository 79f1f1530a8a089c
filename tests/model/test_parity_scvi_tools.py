"""Numerical parity of our VAE, optimizer and schedules with scvi-tools (1.4.2) itself.

For each configuration we build scvi-tools' ``SCVI`` on a small AnnData and our ``VAE`` from the same
``torch.manual_seed``, check that the initial weights are equal, then compare per-cell losses on the same
minibatch (train mode with the same seed before each forward, so dropout masks and the z/library noise are
the same draws, and eval mode), and the weights after 1 and 5 Adam steps.
"""

from __future__ import annotations

import itertools
import warnings

import anndata as ad
import numpy as np
import pytest
import torch

from scvi_scale.model import VAE, ModelConfig
from scvi_scale.train.optim import kl_weight, make_optimizer, max_epochs_heuristic

N_CELLS, N_GENES = 256, 80
RTOL = 1e-5
KL_WEIGHT = 0.7  # not 0 or 1, so a mis-weighted KL term shows


# -- fixtures and helpers -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def scvi():
    return pytest.importorskip("scvi")


@pytest.fixture(scope="module")
def adata() -> ad.AnnData:
    """256 cells x 80 genes of NB counts, three batches with different depths, many zeros, no empty cell."""
    rng = np.random.default_rng(0)
    batch = rng.integers(0, 3, N_CELLS)
    gene_mean = np.exp(rng.normal(0.0, 1.5, N_GENES))  # some genes almost always 0, some in the tens
    depth = np.exp(rng.normal(0.0, 0.4, N_CELLS)) * np.array([0.5, 1.0, 2.0])[batch]
    mean = depth[:, None] * gene_mean[None, :]
    counts = rng.negative_binomial(2.0, 2.0 / (2.0 + mean)).astype(np.float32)
    counts[counts.sum(1) == 0, 0] = 1.0
    out = ad.AnnData(counts)
    out.obs["batch"] = np.array(["b0", "b1", "b2"])[batch]
    return out


def _model_kwargs(cfg: ModelConfig) -> dict:
    """The SCVI keyword arguments that mean the same as our config (all of ModelConfig's fields)."""
    return {f: getattr(cfg, f) for f in cfg.__dataclass_fields__}


def _build_pair(scvi, adata: ad.AnnData, n_batch: int, cfg: ModelConfig, seed: int = 0):
    """scvi-tools' SCVI and our VAE, each built right after ``torch.manual_seed(seed)``."""
    assert n_batch in (1, 3)
    a = adata.copy()
    scvi.model.SCVI.setup_anndata(a, batch_key="batch" if n_batch == 3 else None)
    torch.manual_seed(seed)
    theirs = scvi.model.SCVI(a, **_model_kwargs(cfg))
    assert theirs.summary_stats.n_batch == n_batch
    means = variances = None
    if not cfg.use_observed_lib_size:
        from scvi.model._utils import _init_library_size

        means, variances = _init_library_size(theirs.adata_manager, n_batch)
    torch.manual_seed(seed)
    ours = VAE(N_GENES, n_batch, cfg, library_log_means=means, library_log_vars=variances)
    return theirs, a, ours


def _minibatches(theirs, a: ad.AnnData, batch_size: int, n: int = N_CELLS) -> list[dict[str, torch.Tensor]]:
    """scvi-tools' own minibatch dicts ("X", "batch" (n, 1), "labels" (n, 1)) for the first n cells."""
    loader = theirs._make_data_loader(adata=a, indices=np.arange(n), batch_size=batch_size, shuffle=False)
    return list(loader)


def _omitted_keys(theirs_keys: set[str], cfg: ModelConfig) -> set[str]:
    """scvi-tools' state-dict keys that our model leaves out by design (modules this config never uses)."""
    prefixes = []
    if cfg.use_observed_lib_size:
        prefixes.append("l_encoder.")
    if cfg.dispersion != "gene-cell":
        prefixes.append("decoder.px_r_decoder.")
    if cfg.gene_likelihood != "zinb":
        prefixes.append("decoder.px_dropout_decoder.")
    return {k for k in theirs_keys if k.startswith(tuple(prefixes))}


def _assert_same_initial_state(theirs_module: torch.nn.Module, ours: VAE, cfg: ModelConfig) -> None:
    sd_theirs, sd_ours = theirs_module.state_dict(), ours.state_dict()
    assert set(sd_ours) <= set(sd_theirs), sorted(set(sd_ours) - set(sd_theirs))
    assert set(sd_theirs) - set(sd_ours) == _omitted_keys(set(sd_theirs), cfg)
    for key, value in sd_ours.items():
        assert value.shape == sd_theirs[key].shape, key
        assert torch.equal(value, sd_theirs[key]), f"initial {key} differs"


def _scvi_loss(module: torch.nn.Module, tensors: dict[str, torch.Tensor], weight: float):
    _, _, out = module(tensors, loss_kwargs={"kl_weight": weight})
    return out.loss, out.reconstruction_loss["reconstruction_loss"], out.kl_local


def _assert_losses_match(theirs_module, ours: VAE, tensors: dict[str, torch.Tensor], seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    loss_t, rec_t, kl_t = _scvi_loss(theirs_module, tensors, KL_WEIGHT)
    torch.manual_seed(seed)
    terms = ours(tensors["X"], tensors["batch"], KL_WEIGHT)
    n = tensors["X"].shape[0]
    assert terms.reconstruction_n.shape == terms.kl_z_n.shape == terms.kl_l_n.shape == (n,)
    torch.testing.assert_close(terms.reconstruction_n, rec_t, rtol=RTOL, atol=0)
    torch.testing.assert_close(terms.kl_z_n, kl_t["kl_divergence_z"], rtol=RTOL, atol=0)
    torch.testing.assert_close(terms.kl_l_n, kl_t["kl_divergence_l"], rtol=RTOL, atol=0)
    torch.testing.assert_close(terms.loss, loss_t, rtol=RTOL, atol=0)
    return terms.loss.detach()


# -- the configuration grid ---------------------------------------------------------------------------------------
# (gene_likelihood, dispersion, n_batch, n_layers, observed library): every value of every axis and every pair
# of values of any two axes (an 18-row covering array of the 72-combination grid).
PAIRWISE_GRID = [
    ("zinb", "gene", 1, 1, True),
    ("zinb", "gene", 3, 2, False),
    ("zinb", "gene-batch", 1, 2, False),
    ("zinb", "gene-batch", 3, 1, True),
    ("zinb", "gene-cell", 3, 1, False),
    ("zinb", "gene-cell", 1, 2, True),
    ("nb", "gene", 3, 2, True),
    ("nb", "gene", 1, 1, False),
    ("nb", "gene-batch", 1, 1, True),
    ("nb", "gene-batch", 3, 2, False),
    ("nb", "gene-cell", 1, 2, False),
    ("nb", "gene-cell", 3, 1, True),
    ("poisson", "gene", 3, 1, False),
    ("poisson", "gene", 1, 2, True),
    ("poisson", "gene-batch", 3, 2, True),
    ("poisson", "gene-batch", 1, 1, False),
    ("poisson", "gene-cell", 1, 1, True),
    ("poisson", "gene-cell", 3, 2, False),
]
# covariates in the encoder, the norm placements and the logistic-normal latent, once each
EXTRA_GRID = {
    "encode_covariates": (3, dict(encode_covariates=True, n_layers=2, use_observed_lib_size=False)),
    "encode_covariates-shallow_inject": (
        3,
        dict(encode_covariates=True, deeply_inject_covariates=False, n_layers=2, gene_likelihood="nb"),
    ),
    "layer_norm_only": (3, dict(use_batch_norm="none", use_layer_norm="both", n_layers=2, dispersion="gene-batch")),
    "bn_encoder-ln_decoder": (3, dict(use_batch_norm="encoder", use_layer_norm="decoder", use_observed_lib_size=False)),
    "logistic_normal": (3, dict(latent_distribution="ln", dispersion="gene-cell")),
}

CASES = [
    pytest.param(
        n_batch,
        dict(gene_likelihood=lik, dispersion=disp, n_layers=n_layers, use_observed_lib_size=observed),
        id=f"{lik}-{disp}-batch{n_batch}-layers{n_layers}-{'observed' if observed else 'latent'}",
    )
    for lik, disp, n_batch, n_layers, observed in PAIRWISE_GRID
] + [pytest.param(n_batch, kw, id=name) for name, (n_batch, kw) in EXTRA_GRID.items()]


def test_grid_covers_every_pair_of_axis_values() -> None:
    columns = list(zip(*PAIRWISE_GRID, strict=True))
    assert [set(c) for c in columns] == [
        {"zinb", "nb", "poisson"},
        {"gene", "gene-batch", "gene-cell"},
        {1, 3},
        {1, 2},
        {True, False},
    ]
    for i, j in itertools.combinations(range(len(columns)), 2):
        wanted = set(itertools.product(set(columns[i]), set(columns[j])))
        assert {(row[i], row[j]) for row in PAIRWISE_GRID} == wanted, (i, j)


# -- 2. initial weights and loss parity -------------------------------------------------------------------------
@pytest.mark.parity
@pytest.mark.parametrize(("n_batch", "kwargs"), CASES)
def test_loss_matches_scvi_tools(scvi, adata: ad.AnnData, n_batch: int, kwargs: dict) -> None:
    cfg = ModelConfig(**kwargs)
    theirs, a, ours = _build_pair(scvi, adata, n_batch, cfg, seed=11)
    module = theirs.module
    _assert_same_initial_state(module, ours, cfg)
    (tensors,) = _minibatches(theirs, a, batch_size=128, n=128)
    assert tensors["batch"].shape == (128, 1) and int(tensors["batch"].max()) == n_batch - 1

    module.eval()
    ours.eval()
    eval_loss = _assert_losses_match(module, ours, tensors, seed=5)
    if cfg.use_observed_lib_size:
        assert not ours(tensors["X"], tensors["batch"]).kl_l_n.any()
    else:
        assert (ours(tensors["X"], tensors["batch"]).kl_l_n > 0).all()

    module.train()
    ours.train()
    train_loss = _assert_losses_match(module, ours, tensors, seed=5)
    # train mode really differs (dropout, minibatch BN statistics), so the comparison above tested it
    assert not torch.isclose(train_loss, eval_loss, rtol=1e-4)
    # the training forward updated BN running statistics identically
    sd_theirs = module.state_dict()
    bn_keys = [k for k in ours.state_dict() if k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert bool(bn_keys) == (cfg.use_batch_norm != "none")
    for key in bn_keys:
        torch.testing.assert_close(ours.state_dict()[key], sd_theirs[key], rtol=RTOL, atol=1e-7, msg=key)
    assert all(int(sd_theirs[k]) == 1 for k in bn_keys if k.endswith("num_batches_tracked"))


@pytest.mark.parity
def test_initial_weights_depend_on_the_seed(scvi, adata: ad.AnnData) -> None:
    """The equal-weights check is not vacuous: another seed gives scvi-tools other weights."""
    cfg = ModelConfig()
    theirs, _, _ = _build_pair(scvi, adata, 3, cfg, seed=0)
    _, _, ours_other = _build_pair(scvi, adata, 3, cfg, seed=1)
    sd = theirs.module.state_dict()
    assert not torch.equal(ours_other.px_r, sd["px_r"])
    assert not torch.equal(
        ours_other.state_dict()["decoder.px_scale_decoder.0.weight"], sd["decoder.px_scale_decoder.0.weight"]
    )


@pytest.mark.parity
@pytest.mark.parametrize("transform_batch", [None, 2])
def test_generative_parameters_match_scvi_tools(scvi, adata: ad.AnnData, transform_batch: int | None) -> None:
    """Eval-mode inference and generative outputs, including ``transform_batch`` (decoder and gene-batch theta)."""
    cfg = ModelConfig(dispersion="gene-batch", use_observed_lib_size=False, n_layers=2)
    theirs, a, ours = _build_pair(scvi, adata, 3, cfg, seed=3)
    module = theirs.module.eval()
    ours.eval()
    (tensors,) = _minibatches(theirs, a, batch_size=64, n=64)
    batch_n = tensors["batch"].reshape(-1)
    with torch.no_grad():
        torch.manual_seed(9)
        inf_t = module.inference(tensors["X"], tensors["batch"])
        torch.manual_seed(9)
        inf_o = ours.inference(tensors["X"], batch_n)
        torch.testing.assert_close(inf_o.qz_m, inf_t["qz"].loc, rtol=RTOL, atol=1e-6)
        torch.testing.assert_close(inf_o.qz_v, inf_t["qz"].scale ** 2, rtol=RTOL, atol=1e-7)
        torch.testing.assert_close(inf_o.z, inf_t["z"], rtol=RTOL, atol=1e-6)
        torch.testing.assert_close(inf_o.library, inf_t["library"], rtol=RTOL, atol=1e-6)
        tb = None if transform_batch is None else torch.tensor(transform_batch)
        gen_t = module.generative(inf_t["z"], inf_t["library"], tensors["batch"], transform_batch=tb)
        gen_o = ours.generative(inf_t["z"], inf_t["library"], batch_n, transform_batch=transform_batch)
    px = gen_t["px"]
    torch.testing.assert_close(gen_o.scale, px.scale, rtol=RTOL, atol=1e-9)
    torch.testing.assert_close(gen_o.rate, px.mu, rtol=RTOL, atol=1e-7)
    torch.testing.assert_close(gen_o.theta, px.theta, rtol=RTOL, atol=0)
    torch.testing.assert_close(gen_o.zi_logits, px.zi_logits, rtol=RTOL, atol=1e-6)
    if transform_batch is not None:  # every cell got batch 2's dispersion
        torch.testing.assert_close(gen_o.theta, torch.exp(ours.px_r[:, 2]).expand(64, -1), rtol=0, atol=0)


# -- 3. optimizer steps ------------------------------------------------------------------------------------------
# Float32 runs drift apart by rounding (the one-hot injection sums in another order), and a ReLU input that sits
# within that rounding of 0 then flips a unit on or off, so un-synced float32 weights can part by more than any
# tolerance after a few steps. Hence: float32 steps each start from identical states (weights, BN statistics and
# Adam moments copied over after checking them), and the 5 un-synced steps run in float64, where rounding is 1e-16.
OPTIM_CASES = [
    pytest.param(
        3,
        dict(gene_likelihood="zinb", dispersion="gene-batch", n_layers=2, use_observed_lib_size=False),
        id="zinb-gene-batch-latent",
    ),
    pytest.param(1, dict(gene_likelihood="nb", dispersion="gene-cell"), id="nb-gene-cell-observed"),
    pytest.param(3, dict(gene_likelihood="poisson", encode_covariates=True), id="poisson-encode_covariates"),
]
# scvi-tools' one-hot products are float32 ("gene-batch" dispersion, latent-library prior): float64 configs avoid the
# first and keep the library prior buffers float32 for the second
OPTIM_CASES_FLOAT64 = [
    pytest.param(3, dict(gene_likelihood="zinb", n_layers=2, use_observed_lib_size=False), id="zinb-gene-latent"),
    pytest.param(
        3, dict(gene_likelihood="nb", dispersion="gene-cell", encode_covariates=True), id="nb-gene-cell-encode"
    ),
    pytest.param(1, dict(gene_likelihood="poisson", n_layers=2), id="poisson-gene-observed"),
]
OPT_KL_WEIGHT = 0.3


def _pre_bn_biases(ours: VAE) -> set[str]:
    """Biases of Linear layers followed by a BatchNorm: in train mode their exact gradient is 0."""
    keys = ours.state_dict()
    return {k for k in keys if k.endswith(".0.bias") and k.replace(".0.bias", ".1.running_mean") in keys}


def _optimizers(scvi, module: torch.nn.Module, ours: VAE) -> tuple[torch.optim.Adam, torch.optim.Adam]:
    """scvi-tools' optimizer as its TrainingPlan builds it (Adam over requires_grad parameters), and ours."""
    opt_theirs = scvi.train.TrainingPlan(module).configure_optimizers()["optimizer"]
    opt_ours = make_optimizer(ours)
    assert isinstance(opt_theirs, torch.optim.Adam) and isinstance(opt_ours, torch.optim.Adam)
    for name in ("lr", "eps", "weight_decay", "betas", "amsgrad", "maximize"):
        assert opt_ours.defaults[name] == opt_theirs.defaults[name], name
    assert (opt_ours.defaults["lr"], opt_ours.defaults["eps"], opt_ours.defaults["weight_decay"]) == (1e-3, 0.01, 1e-6)
    return opt_theirs, opt_ours


def _backward_both(module, ours: VAE, opt_theirs, opt_ours, tensors: dict, seed: int, cfg: ModelConfig) -> None:
    torch.manual_seed(seed)
    loss_t, _, _ = _scvi_loss(module, tensors, OPT_KL_WEIGHT)
    opt_theirs.zero_grad()
    loss_t.backward()
    torch.manual_seed(seed)
    loss_o = ours(tensors["X"], tensors["batch"], OPT_KL_WEIGHT).loss
    opt_ours.zero_grad()
    loss_o.backward()
    torch.testing.assert_close(loss_o, loss_t, rtol=RTOL, atol=0)
    params_t = dict(module.named_parameters())
    for name, p in ours.named_parameters():
        # the same parameters get gradients (px_r gets none under Poisson, in both)
        assert (p.grad is None) == (params_t[name].grad is None), name
        assert p.grad is not None or (name == "px_r" and cfg.gene_likelihood == "poisson"), name


def _assert_states_close(module, ours: VAE, pre_bn: set[str], n_steps: int) -> None:
    sd_theirs = module.state_dict()
    for key, value in ours.state_dict().items():
        if key in pre_bn:
            # a zero gradient computed as rounding noise, which Adam (eps 0.01) turns into steps of ~0.1 x noise:
            # both must stay within 1% of a learning-rate step of each other
            torch.testing.assert_close(value, sd_theirs[key], rtol=0, atol=1e-5 * n_steps, msg=key)
        else:
            torch.testing.assert_close(value, sd_theirs[key], rtol=1e-5, atol=1e-6, msg=f"{key} after {n_steps}")


def _check_and_sync(module, ours: VAE, opt_theirs, opt_ours, pre_bn: set[str], step: int) -> None:
    """Compare Adam's state by parameter name, then copy scvi-tools' weights, buffers and moments into ours."""
    params_t = dict(module.named_parameters())
    for name, p in ours.named_parameters():
        st_t, st_o = opt_theirs.state.get(params_t[name], {}), opt_ours.state.get(p, {})
        assert bool(st_t) == bool(st_o), name
        if not st_o:
            continue
        assert float(st_o["step"]) == float(st_t["step"]) == step, name
        for moment in ("exp_avg", "exp_avg_sq"):
            if name not in pre_bn:
                torch.testing.assert_close(st_o[moment], st_t[moment], rtol=1e-5, atol=1e-6, msg=f"{name} {moment}")
            st_o[moment].copy_(st_t[moment])
    sd_theirs = module.state_dict()
    ours.load_state_dict({k: sd_theirs[k] for k in ours.state_dict()})


@pytest.mark.parity
@pytest.mark.parametrize(("n_batch", "kwargs"), OPTIM_CASES)
def test_adam_steps_match_scvi_tools(scvi, adata: ad.AnnData, n_batch: int, kwargs: dict) -> None:
    cfg = ModelConfig(**kwargs)
    theirs, a, ours = _build_pair(scvi, adata, n_batch, cfg, seed=21)
    module = theirs.module
    _assert_same_initial_state(module, ours, cfg)
    init_theirs = {k: v.clone() for k, v in module.state_dict().items()}
    opt_theirs, opt_ours = _optimizers(scvi, module, ours)
    batches = _minibatches(theirs, a, batch_size=64)
    pre_bn = _pre_bn_biases(ours)
    module.train()
    ours.train()
    for step in range(1, 6):
        if step > 1:
            _check_and_sync(module, ours, opt_theirs, opt_ours, pre_bn, step - 1)
        _backward_both(module, ours, opt_theirs, opt_ours, batches[step % len(batches)], 100 + step, cfg)
        params_t = dict(module.named_parameters())
        for name in pre_bn:
            # pure rounding noise in both (the summation order differs), far below the layer's weight gradient
            weight_grad = params_t[name.replace(".bias", ".weight")].grad.abs().max()
            assert dict(ours.named_parameters())[name].grad.abs().max() <= 1e-4 * weight_grad, name
            assert params_t[name].grad.abs().max() <= 1e-4 * weight_grad, name
        opt_theirs.step()
        opt_ours.step()
        _assert_states_close(module, ours, pre_bn, n_steps=1)

    # the modules we omit got no gradient in scvi-tools, so Adam never moved them
    sd_theirs = module.state_dict()
    omitted = _omitted_keys(set(sd_theirs), cfg)
    assert omitted
    for key in omitted:
        assert torch.equal(sd_theirs[key], init_theirs[key]), key
    # and the steps did move the rest
    key = "decoder.px_scale_decoder.0.weight"
    assert (sd_theirs[key] - init_theirs[key]).abs().max() > 1e-3


def _to_float64(model: torch.nn.Module) -> None:
    model.double()
    if getattr(model, "library_log_means", None) is not None:  # scvi-tools multiplies them by a float32 one-hot
        model.library_log_means = model.library_log_means.float()
        model.library_log_vars = model.library_log_vars.float()


@pytest.mark.parity
@pytest.mark.parametrize(("n_batch", "kwargs"), OPTIM_CASES_FLOAT64)
def test_adam_five_steps_float64_match_scvi_tools(scvi, adata: ad.AnnData, n_batch: int, kwargs: dict) -> None:
    cfg = ModelConfig(**kwargs)
    theirs, a, ours = _build_pair(scvi, adata, n_batch, cfg, seed=21)
    module = theirs.module
    _assert_same_initial_state(module, ours, cfg)
    _to_float64(module)
    _to_float64(ours)
    opt_theirs, opt_ours = _optimizers(scvi, module, ours)
    batches = _minibatches(theirs, a, batch_size=64)
    module.train()
    ours.train()
    for step in range(1, 6):
        tensors = dict(batches[step % len(batches)])
        tensors["X"] = tensors["X"].double()
        _backward_both(module, ours, opt_theirs, opt_ours, tensors, 100 + step, cfg)
        assert module.decoder.px_scale_decoder[0].weight.grad.dtype == torch.float64
        opt_theirs.step()
        opt_ours.step()
        if step in (1, 5):
            # no exemption for the pre-BN biases here: their noise gradients are ~1e-16
            _assert_states_close(module, ours, set(), n_steps=step)


# -- 4. KL warm-up and the epoch heuristic ------------------------------------------------------------------------
def test_kl_weight_follows_the_spec() -> None:
    assert kl_weight(0, 0) == 0.0  # the first epoch has weight 0
    assert kl_weight(1, 999) == 1 / 400  # epoch mode: the step does not matter
    assert kl_weight(399, 0) == 399 / 400  # the last of 400 default epochs: warm-up never finishes
    assert kl_weight(79, 0) == pytest.approx(0.1975)  # the last of 80 epochs (100k cells)
    assert kl_weight(400, 0) == 1.0 and kl_weight(1000, 0) == 1.0
    assert kl_weight(5, 0, n_epochs_kl_warmup=10, min_kl_weight=0.2, max_kl_weight=0.6) == pytest.approx(0.4)
    # step mode only when the epoch warm-up is off
    assert kl_weight(3, 50, n_epochs_kl_warmup=None, n_steps_kl_warmup=200) == 0.25
    assert kl_weight(3, 50, n_epochs_kl_warmup=0, n_steps_kl_warmup=200) == 0.25
    assert kl_weight(0, 200, n_epochs_kl_warmup=None, n_steps_kl_warmup=200) == 1.0
    assert kl_weight(3, 50, n_epochs_kl_warmup=None, n_steps_kl_warmup=None) == 1.0
    assert kl_weight(3, 50, n_epochs_kl_warmup=None, max_kl_weight=0.5) == 0.5


@pytest.mark.parity
def test_kl_weight_matches_scvi_tools(scvi) -> None:
    from scvi.train._trainingplans import _compute_kl_weight

    epochs_opts = [None, 0, 1, 10, 400]
    steps_opts = [None, 0, 7, 1000]
    bounds = [(0.0, 1.0), (0.25, 0.75), (0.5, 0.5)]
    n_checked = 0
    for n_ep, n_st, (lo, hi) in itertools.product(epochs_opts, steps_opts, bounds):
        for epoch, step in itertools.product([0, 1, 5, 9, 10, 399, 400, 1000], [0, 3, 6, 7, 999, 1000, 5000]):
            ref = float(_compute_kl_weight(epoch, step, n_ep, n_st, max_kl_weight=hi, min_kl_weight=lo))
            got = kl_weight(epoch, step, n_ep, n_st, min_kl_weight=lo, max_kl_weight=hi)
            assert got == pytest.approx(ref, rel=1e-12, abs=1e-15), (n_ep, n_st, lo, hi, epoch, step)
            n_checked += 1
    assert n_checked == len(epochs_opts) * len(steps_opts) * len(bounds) * 56


@pytest.mark.parity
def test_kl_warmup_defaults_match_training_plan(scvi, adata: ad.AnnData) -> None:
    import inspect

    theirs, _, _ = _build_pair(scvi, adata, 1, ModelConfig())
    plan = scvi.train.TrainingPlan(theirs.module)
    ours = inspect.signature(kl_weight).parameters
    assert ours["n_epochs_kl_warmup"].default == plan.n_epochs_kl_warmup == 400
    assert ours["n_steps_kl_warmup"].default is plan.n_steps_kl_warmup is None
    assert ours["min_kl_weight"].default == plan.min_kl_weight == 0.0
    assert ours["max_kl_weight"].default == plan.max_kl_weight == 1.0
    optim = inspect.signature(make_optimizer).parameters
    assert (optim["lr"].default, optim["eps"].default, optim["weight_decay"].default) == (
        plan.lr,
        plan.eps,
        plan.weight_decay,
    )


SPEC_EPOCHS = [
    (1, 400),
    (5_000, 400),
    (20_000, 400),
    (50_000, 160),
    (100_000, 80),
    (1_000_000, 8),
    (8_000_000, 1),
    (9_000_000, 1),
    (50_000_000, 1),
]


def test_max_epochs_heuristic_follows_the_spec() -> None:
    for n_obs, expected in SPEC_EPOCHS:
        assert max_epochs_heuristic(n_obs) == expected, n_obs
    assert max_epochs_heuristic(30_000) == 267  # round(266.67)


@pytest.mark.parity
def test_max_epochs_heuristic_matches_scvi_tools(scvi) -> None:
    from scvi.model._utils import get_max_epochs_heuristic

    n_obs_values = [n for n, _ in SPEC_EPOCHS] + [20_001, 30_000, 33_333, 123_456, 5_333_333, 5_333_334]
    for n_obs in n_obs_values:
        with warnings.catch_warnings():
            # scvi-tools warns when its heuristic gives 1 epoch; ours leaves that to the caller
            warnings.filterwarnings("ignore", message="The default number of maximum epochs", category=UserWarning)
            expected = get_max_epochs_heuristic(n_obs)
        assert max_epochs_heuristic(n_obs) == expected, n_obs
