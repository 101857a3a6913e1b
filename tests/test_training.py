"""specprof.training: certified differentiable bounds, clipping, the Lipschitz chain and the
monitor, checked against dense oracles (the module's own forward pushed through a basis, and
tests/oracle.py)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn

from specprof.engine.errors import SpecprofError  # noqa: E402
from specprof.engine.operator import dense_operator  # noqa: E402
from specprof.training import (  # noqa: E402
    LipschitzBound,
    OperatorNormBound,
    SpectralMonitor,
    clip_operator_norm_,
    lipschitz_bound,
    lipschitz_factors,
    module_layer,
    operator_norm_bound,
)
from specprof.training.bounds import certified_top, conjugate_representatives  # noqa: E402
from tests.oracle import conv_matrix, conv_transpose_matrix  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
CONV_T = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}


def module_matrix(module: nn.Module, shape: tuple[int, ...]) -> np.ndarray:
    """The module's linear part on one input of ``shape``: its own forward (float64) applied
    to the identity basis, minus its value at 0 (the bias)."""
    module = module.double()
    n = math.prod(shape)
    basis = torch.eye(n, dtype=torch.float64).reshape(n, *shape)
    with torch.no_grad():
        y = module(basis) - module(torch.zeros(1, *shape, dtype=torch.float64))
    return y.reshape(n, -1).T.numpy()


def true_norm(module: nn.Module, shape: tuple[int, ...], near: float = math.inf) -> float:
    """The operator norm, from the smaller Gram's top eigenvalue (fast), or from an SVD where
    that estimate comes within 1e-9 of ``near`` (a bound being checked)."""
    matrix = module_matrix(module, shape)
    gram = matrix @ matrix.T if matrix.shape[0] <= matrix.shape[1] else matrix.T @ matrix
    estimate = math.sqrt(max(float(np.linalg.eigvalsh(gram)[-1]), 0.0))
    if estimate * (1 + 1e-9) < near:
        return estimate
    return float(np.linalg.norm(matrix, 2))


def zoo(count: int = 60, seed: int = 0) -> list[tuple[nn.Module, tuple[int, ...]]]:
    """Random convolutions: 1-3 spatial dims, strides, dilations, groups, pads, transposes."""
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    layers: list[tuple[nn.Module, tuple[int, ...]]] = []
    while len(layers) < count:
        d = 1 + len(layers) % 3
        g = int(rng.choice([1, 2]))
        c_in, c_out = g * int(rng.integers(1, 4)), g * int(rng.integers(1, 4))
        k = int(rng.integers(1, 4 if d == 3 else 6))
        s, dil = int(rng.integers(1, 3)), int(rng.integers(1, 3))
        n = int(rng.integers(3, 6)) if d == 3 else int(rng.integers(max(3, dil * (k - 1) + 1), 13))
        pad = int(rng.integers(0, dil * (k - 1) // 2 + 2))
        if rng.random() < 0.3:
            out_pad = int(rng.integers(0, s)) if s > 1 else 0
            module = CONV_T[d](c_in, c_out, k, stride=s, padding=pad, dilation=dil, groups=g,
                               output_padding=out_pad)
        else:
            module = CONV[d](c_in, c_out, k, stride=s, padding=pad, dilation=dil, groups=g)
        shape = (c_in, *([n] * d))
        try:
            with torch.no_grad():
                module(torch.zeros(1, *shape))
        except RuntimeError:  # an empty output: not a layer anyone trains
            continue
        layers.append((module.double(), shape))
    return layers


# ------------------------------------------------------------------------------ the bound


def test_bound_is_certified_and_tight_on_a_zoo() -> None:
    ratios = []
    for module, shape in zoo():
        bound = operator_norm_bound(module, shape).item()
        true = true_norm(module, shape, near=bound)
        assert bound >= true, (module, shape, bound, true)
        ratios.append(bound / true)
    assert float(np.median(ratios)) <= 1.2
    assert min(ratios) < 1.0 + 1e-9  # stride-1 circular-embeddable cases are exact


def test_bound_of_float32_weights_is_certified() -> None:
    for module, shape in zoo(10, seed=1):
        module = module.float()
        bound = operator_norm_bound(module, shape)
        assert bound.dtype == torch.float32
        assert bound.item() >= true_norm(module, shape, near=bound.item())  # module_matrix works in float64


def test_module_layer_is_the_module_operator() -> None:
    cases = [(nn.Conv2d(2, 3, 3, padding="same", dilation=2), (2, 7, 6)),
             (nn.Conv1d(4, 2, 4, padding="same", groups=2), (4, 9)),
             (nn.ConvTranspose2d(2, 4, 3, stride=2, padding=1, output_padding=1, groups=2),
              (2, 4, 5)),
             (nn.Linear(6, 4), (6,))]
    for module, shape in cases:
        layer = module_layer(module.double(), shape, name="x")
        assert np.allclose(dense_operator(layer), module_matrix(module, shape), atol=1e-12)


def test_bound_matches_the_independent_oracle() -> None:
    torch.manual_seed(3)
    conv = nn.Conv2d(3, 4, 3, stride=2, padding=1).double()
    matrix = conv_matrix(conv.weight.detach().numpy(), (3, 9, 9), stride=2, padding=1)
    assert operator_norm_bound(conv, (3, 9, 9)).item() >= np.linalg.norm(matrix, 2)
    convt = nn.ConvTranspose1d(2, 3, 4, stride=2, padding=1).double()
    matrix = conv_transpose_matrix(convt.weight.detach().numpy(), (2, 7), stride=2, padding=1)
    bound = operator_norm_bound(convt, (2, 7)).item()
    assert np.linalg.norm(matrix, 2) <= bound <= 1.3 * np.linalg.norm(matrix, 2)


def test_bound_on_a_large_grid_is_certified() -> None:
    """Hundreds of symbols, the maximum certified by Cholesky factors."""
    torch.manual_seed(2)
    for module, shape in ((nn.Conv2d(3, 4, 3, padding=1), (3, 24, 24)),
                          (nn.Conv2d(2, 3, 5, stride=2, padding=2), (2, 40, 40))):
        module = module.double()
        bound = operator_norm_bound(module, shape).item()
        true = true_norm(module, shape, near=bound)
        assert true <= bound <= 1.05 * true


def test_certified_top_finds_the_maximum_from_any_start() -> None:
    """A wrong first guess (an earlier step's maximum) is caught by the Cholesky certificates:
    the bound still covers every matrix, within rounding of the true maximum."""
    rng = np.random.default_rng(5)
    for rows, cols in ((3, 5), (6, 4), (1, 7), (7, 1)):
        matrices = rng.standard_normal((40, rows, cols)) + 1j * rng.standard_normal(
            (40, rows, cols))
        norms = np.linalg.norm(matrices, 2, axis=(1, 2))  # numpy's SVD: the oracle
        stack = torch.from_numpy(matrices.reshape(2, 20, rows, cols))
        for start in (None, int(np.argmin(norms)), 3):
            bound, index, vector = certified_top(stack, start)
            assert norms.max() <= bound <= norms.max() * (1 + 1e-12)
            assert norms[index] == pytest.approx(norms.max(), rel=1e-12)
            gram = matrices[index] @ matrices[index].conj().T if rows <= cols else (
                matrices[index].conj().T @ matrices[index])
            assert np.linalg.norm(gram @ vector.numpy()) == pytest.approx(norms.max() ** 2)


def test_conjugate_representatives_cover_the_grid_once() -> None:
    for grid in ((10, 10), (6, 6), (7,), (8,), (5, 4), (3, 4, 6), (2, 3, 5), (1, 1)):
        half = (*grid[:-1], grid[-1] // 2 + 1)
        kept = np.array(np.unravel_index(conjugate_representatives(grid), half)).T
        kept_set = {tuple(f) for f in kept}
        conjugates = {tuple(-f % np.array(grid)) for f in kept}
        assert kept_set | conjugates == set(np.ndindex(*grid))  # every frequency or its pair
        assert all(c == f or c not in kept_set  # no pair kept twice
                   for f, c in zip(map(tuple, kept), (tuple(-f % np.array(grid)) for f in kept),
                                   strict=True))


def test_a_bound_object_stays_certified_while_the_weight_moves() -> None:
    """``OperatorNormBound`` starts from the last maximizing symbol: after each random step of
    the weight (which moves the maximum), the bound is still above the dense norm."""
    torch.manual_seed(4)
    conv = nn.Conv2d(3, 4, 3, stride=2, padding=1).double()
    bound_of = OperatorNormBound(conv, (3, 7, 7))
    tops = set()
    for _ in range(12):
        with torch.no_grad():
            conv.weight.add_(0.3 * torch.randn_like(conv.weight))
        bound = bound_of().item()
        tops.add(bound_of.last_top)
        true = true_norm(conv, (3, 7, 7), near=bound)
        assert true <= bound <= 1.3 * true
    assert len(tops) > 1  # the maximum moved: the start was wrong at least once


def test_linear_bound_is_its_spectral_norm() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(7, 5).double()
    bound = operator_norm_bound(linear, (7,)).item()
    exact = float(np.linalg.norm(linear.weight.detach().numpy(), 2))
    assert exact <= bound <= exact * (1 + 1e-12)


def call_with_weight(module: nn.Module, weight: torch.Tensor, shape: tuple[int, ...]
                     ) -> torch.Tensor:
    original = module.weight
    del module.weight
    module.weight = weight
    try:
        return operator_norm_bound(module, shape)
    finally:
        del module.weight
        module.weight = original


@pytest.mark.parametrize(("module", "shape"), [
    (nn.Conv2d(2, 3, 3, stride=2, padding=1), (2, 5, 5)),
    (nn.Conv1d(4, 4, 3, dilation=2, groups=2), (4, 9)),
    (nn.ConvTranspose1d(2, 3, 3, stride=2, padding=1, output_padding=1), (2, 6)),
    (nn.Conv3d(1, 2, 2, padding=1), (1, 3, 3, 3)),
    (nn.Linear(5, 4), (5,)),
])
def test_gradient_matches_central_differences(module: nn.Module, shape: tuple[int, ...]
                                              ) -> None:
    torch.manual_seed(0)
    module = module.double()
    weight = module.weight.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda w: call_with_weight(module, w, shape), (weight,))


def test_bound_follows_the_weight_device_and_needs_no_grad() -> None:
    conv = nn.Conv2d(2, 2, 3, padding=1)
    with torch.no_grad():
        bound = operator_norm_bound(conv, (2, 6, 6))
    assert bound.ndim == 0 and bound.device == conv.weight.device and not bound.requires_grad


def test_unsupported_padding_mode_is_refused() -> None:
    with pytest.raises(SpecprofError, match="padding_mode"):
        operator_norm_bound(nn.Conv2d(1, 1, 3, padding=1, padding_mode="reflect"), (1, 5, 5))


# ------------------------------------------------------------------------------ clipping


@pytest.mark.parametrize(("module", "shape"), [
    (nn.Conv2d(3, 5, 3, padding=1), (3, 8, 8)),
    (nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2), (4, 9, 9)),
    (nn.ConvTranspose2d(3, 3, 3, stride=2, padding=1), (3, 5, 5)),
    (nn.ConvTranspose1d(4, 6, 4, stride=2, padding=1, groups=2), (4, 7)),
    (nn.Conv3d(2, 2, 3, padding=1), (2, 4, 4, 4)),
    (nn.Conv1d(2, 4, 5, dilation=2, padding=2), (2, 12)),
    (nn.Linear(6, 4), (6,)),
])
def test_clipping_certifies_the_true_norm(module: nn.Module, shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    module = module.double()
    with torch.no_grad():
        module.weight.mul_(4.0)  # well above 1
    assert true_norm(module, shape) > 1.0
    bound = clip_operator_norm_(module, 1.0, shape)
    assert bound <= 1.0
    assert true_norm(module, shape, near=1.0) <= 1.0 + 1e-6


def test_clipping_changes_less_than_scaling_and_leaves_small_weights_alone() -> None:
    torch.manual_seed(1)
    conv = nn.Conv2d(4, 6, 3, padding=1).double()
    before = conv.weight.detach().clone()
    bound = operator_norm_bound(conv, (4, 8, 8)).item()
    clip_operator_norm_(conv, 0.5 * bound, (4, 8, 8))
    change = float((conv.weight.detach() - before).norm() / before.norm())
    assert change < 0.5  # plain scaling by 0.5 changes the weight by 50%
    again = conv.weight.detach().clone()
    clip_operator_norm_(conv, bound, (4, 8, 8))
    assert torch.equal(conv.weight, again)


# ------------------------------------------------------------------------------ the chain


def small_cnn() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, stride=2), nn.BatchNorm2d(4)),
        nn.LeakyReLU(0.1), nn.AvgPool2d(2), nn.Flatten(), nn.Dropout(0.2),
        nn.Linear(4, 3)).double()
    model[3][1].running_var.uniform_(0.5, 2.0)
    return model.eval()


def test_lipschitz_bound_is_above_the_product_of_true_norms() -> None:
    model = small_cnn()
    bound = lipschitz_bound(model, (1, 8, 8))
    factors = dict(lipschitz_factors(model, (1, 8, 8)))
    bn = model[3][1]
    bn_scale = float((bn.weight / torch.sqrt(bn.running_var + bn.eps)).abs().max())
    product = (true_norm(model[0], (1, 8, 8)) * true_norm(model[3][0], (4, 4, 4)) * bn_scale
               * true_norm(model[5], (4, 2, 2)) * true_norm(model[8], (4,)))
    assert bound.item() >= product
    assert float(factors["5"]) == pytest.approx(0.5)  # 2x2 average: 1/sqrt(4)
    assert factors["2"] == 1.0 and factors["1"] == 1.0
    bound.backward()  # differentiable through every layer
    assert model[0].weight.grad is not None and bn.weight.grad is not None
    # The whole network's true Lipschitz constant on random pairs stays below the bound.
    x = torch.randn(200, 1, 8, 8, dtype=torch.float64)
    y = x + 1e-3 * torch.randn_like(x)
    with torch.no_grad():
        ratio = ((model(x) - model(y)).flatten(1).norm(dim=1)
                 / (x - y).flatten(1).norm(dim=1)).max()
    assert float(ratio) <= float(bound)


def test_lipschitz_bound_object_matches_the_function_and_its_gradient() -> None:
    """``LipschitzBound`` (built once, called every step) gives ``lipschitz_bound``'s value,
    a gradient that matches central differences (float64), and follows a replaced module."""
    model = small_cnn()
    penalty = LipschitzBound(model, (1, 8, 8))
    value = penalty()
    assert value.item() == pytest.approx(lipschitz_bound(model, (1, 8, 8)).item(), rel=1e-12)
    value.backward()
    weight = model[3][0].weight
    analytic = weight.grad.clone()
    with torch.no_grad():
        for index in ((0, 0, 0, 0), (1, 2, 1, 2), (3, 1, 2, 0)):
            original = float(weight[index])
            weight[index] = original + 1e-6
            up = penalty().item()
            weight[index] = original - 1e-6
            down = penalty().item()
            weight[index] = original
            assert (up - down) / 2e-6 == pytest.approx(float(analytic[index]), rel=1e-5)
    model[0] = nn.Conv2d(1, 4, 3, padding=1).double()
    with torch.no_grad():
        model[0].weight.mul_(10.0)
    true = true_norm(model[0], (1, 8, 8))
    rest = lipschitz_bound(nn.Sequential(*list(model)[1:]), (4, 8, 8)).item()
    assert penalty().item() >= true * rest
    assert penalty().item() == pytest.approx(lipschitz_bound(model, (1, 8, 8)).item(),
                                             rel=1e-12)


def test_a_module_used_twice_counts_twice() -> None:
    linear = nn.Linear(4, 4).double()
    with torch.no_grad():
        linear.weight.copy_(2.0 * torch.eye(4, dtype=torch.float64))
    model = nn.Sequential(linear, nn.ReLU(), nn.Sequential(linear))
    assert [name for name, _ in lipschitz_factors(model, (4,))] == ["0", "1", "2.0"]
    bound = LipschitzBound(model, (4,))
    assert 4.0 <= bound().item() <= 4.0 * (1 + 1e-12)  # x -> 2 relu(2x) + b: Lipschitz 4
    bound().backward()
    # each use contributes 2 u u^T (u a unit top vector of 2 I): a trace of 2 + 2
    assert float(linear.weight.grad.trace()) == pytest.approx(4.0)


@pytest.mark.parametrize(("pool", "shape"), [
    (nn.AvgPool2d(3, stride=1, padding=1), (1, 5, 5)),
    (nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False), (1, 6, 6)),
    (nn.AvgPool1d(4, stride=2, ceil_mode=True), (1, 9)),
])
def test_average_pool_constant_bounds_its_operator(pool: nn.Module, shape: tuple[int, ...]
                                                   ) -> None:
    constant = lipschitz_factors(nn.Sequential(pool), shape)[0][1]
    assert float(constant) >= true_norm(pool, shape, near=float(constant))


def test_overlapping_max_pool_gets_sqrt_of_its_overlap() -> None:
    factors = lipschitz_factors(nn.Sequential(nn.MaxPool2d(3, stride=1)), (1, 6, 6))
    assert factors[0][1] == pytest.approx(3.0)  # 9 windows per pixel
    pool = nn.MaxPool1d(3, stride=1)
    x = torch.zeros(1, 1, 5)
    x[0, 0, 2] = 1.0  # one pixel in three windows: ||pool(x)|| = sqrt(3) ||x||
    assert float(pool(x).norm()) == pytest.approx(math.sqrt(3))
    assert lipschitz_factors(nn.Sequential(pool), (1, 5))[0][1] == pytest.approx(math.sqrt(3))


def test_activation_constants_cover_their_derivatives() -> None:
    x = torch.linspace(-8, 8, 200001, dtype=torch.float64, requires_grad=True)
    for module in (nn.GELU(), nn.GELU(approximate="tanh"), nn.SiLU(), nn.Mish(), nn.Sigmoid(),
                   nn.Tanh(), nn.ELU(), nn.Softplus()):
        (grad,) = torch.autograd.grad(module(x).sum(), x)
        constant = lipschitz_factors(nn.Sequential(module), (1,))[0][1]
        assert float(grad.abs().max()) <= float(constant), module


def test_unsupported_modules_are_named() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Softmax(dim=-1))
    with pytest.raises(SpecprofError, match=r"Softmax \(module '1'\)"):
        lipschitz_bound(model, (4,))

    class Residual(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + x

    with pytest.raises(SpecprofError, match="Residual"):
        lipschitz_bound(Residual(), (4,))


# ------------------------------------------------------------------------------ the monitor


def test_three_monitor_steps_store_three_runs(tmp_path: Path, db_url: str) -> None:
    from click.testing import CliRunner

    from specprof.engine.cli import build_cli
    from specprof.engine.store import Store

    db = db_url
    model = small_cnn()
    with SpectralMonitor(model, (1, 8, 8), db=db, every=2, name="tiny") as monitor:
        ids = []
        for step in range(6):
            run = monitor.step(step)
            if run is not None:
                ids.append(run)
            with torch.no_grad():
                model[0].weight.add_(0.01)  # a training step
    assert len(ids) == 3
    result = CliRunner().invoke(build_cli(), ["runs", "--db", db, "--format", "json"])
    assert result.exit_code == 0, result.output
    runs = json.loads(result.output)
    assert sorted(r["id"] for r in runs) == sorted(ids)
    assert sorted(r["model"] for r in runs) == ["tiny@step=0", "tiny@step=2", "tiny@step=4"]
    assert all(r["status"] == "complete" and r["n_spectra"] == 3 for r in runs)
    with Store.open(db) as store:
        assert [store.run_info(i)["config"]["step"] for i in ids] == [0, 2, 4]
        frame = store.query(run=ids[-1])
        assert list(frame["input_shape"]) == ["1x8x8", "4x4x4", "4"]
    # the step is a run parameter that query shows, filters (--where) and sorts on
    later = CliRunner().invoke(build_cli(), ["query", "--db", db, "--where", "step >= 2",
                                             "--sort", "-step", "--format", "json"])
    assert later.exit_code == 0, later.output
    rows = json.loads(later.output)
    assert [row["step"] for row in rows] == [4.0] * 3 + [2.0] * 3
    assert {row["run"] for row in rows} == set(ids[1:])


# ------------------------------------------------------------------------------ imports


def test_import_specprof_stays_light_and_a_missing_torch_is_named() -> None:
    code = ("import sys, specprof; assert 'torch' not in sys.modules; sys.modules['torch'] = None\n"
            "from specprof.engine.errors import MissingExtraError\n"
            "try:\n    import specprof.training\nexcept MissingExtraError as e:\n"
            "    print(e.extra, e.one_line())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=ROOT).stdout
    assert out.startswith("torch ") and "pip install 'specprof[torch]'" in out


# ------------------------------------------------------------------------------ digits


@pytest.mark.slow
def test_penalized_digits_cnn_meets_the_issue_criteria() -> None:
    pytest.importorskip("sklearn")
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import training_digits as example
    finally:
        sys.path.remove(str(ROOT / "examples"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _, plain = example.train(epochs=15)
        _, penalized = example.train(lam=1e-3, epochs=15)
        assert penalized.true_product <= 0.5 * plain.true_product
        assert penalized.accuracy >= plain.accuracy - 0.03
        assert penalized.true_product <= penalized.bound
        # The step's cost against a plain step is a speed target: benchmarks/training_step.py.
    finally:
        torch.set_num_threads(threads)




def test_one_call_bound_reuses_its_plans_and_sees_a_replaced_layer() -> None:
    """lipschitz_bound keeps its LipschitzBound on the model; a replaced module is noticed."""
    from specprof.training.chain import CACHE_ATTRIBUTE

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)).double()
    first = lipschitz_bound(model, (6,))
    kept = getattr(model, CACHE_ATTRIBUTE)[(6,)]
    assert lipschitz_bound(model, (6,)).item() == pytest.approx(first.item(), rel=1e-12)
    assert getattr(model, CACHE_ATTRIBUTE)[(6,)] is kept
    model[2] = nn.Linear(5, 3).double()
    with torch.no_grad():
        model[2].weight.copy_(10 * torch.eye(3, 5, dtype=torch.float64))
    oracle = (torch.linalg.matrix_norm(model[0].weight, ord=2)
              * torch.linalg.matrix_norm(model[2].weight, ord=2)).item()
    assert lipschitz_bound(model, (6,)).item() >= oracle
    assert lipschitz_bound(model, (6,)).item() <= 1.01 * oracle
    assert "_specprof" not in "".join(model.state_dict())
