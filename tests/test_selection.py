"""``auto``: every installed backend is weighed by what it declares (exact, cost), the user's
``--prefer`` order comes first, and the reason says which rule decided."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import pytest

from specprof.engine.base import Backend
from specprof.engine.errors import SpecprofError
from specprof.engine.plugins import get_registry
from specprof.engine.profile import ProfileConfig, choose_backend
from specprof.engine.types import Layer, Request, Spectrum, Support
from specprof.plugins.backends.selection import EXACT_BUDGET_S, select_backend


def _conv(c: int, n: int, k: int = 3, pad: int = 1) -> Layer:
    weight = np.random.default_rng(0).standard_normal((c, c, k, k))
    return Layer(name=f"conv{c}x{n}", op_type="Conv", weight=weight, pads=(pad,) * 4,
                 input_shape=(c, n, n))


class Fake(Backend):
    """A backend whose declarations are set per test; it is never run."""

    name: ClassVar[str] = "fake"
    kind: ClassVar[Any] = "operator"
    exact: ClassVar[bool] = True
    seconds: ClassVar[float | None] = 0.0

    def supports(self, layer: Layer, request: Request) -> Support:
        return Support.yes()

    def cost(self, layer: Layer, request: Request) -> float | None:
        return self.seconds

    def compute(self, layer: Layer, request: Request) -> Spectrum:
        raise AssertionError("selection never computes")


def _fake(name: str, exact: bool, seconds: float | None) -> Backend:
    cls = type(name, (Fake,), {"name": name, "exact": exact, "seconds": seconds})
    return cls()


def test_small_conv_zero_padding_is_exact_and_says_why() -> None:
    backend, reason = choose_backend(_conv(4, 8), Request(), "auto", get_registry())
    assert backend is not None and backend.name == "exact"
    assert reason.startswith("cheapest exact, ")


def test_large_conv_zero_padding_goes_to_the_certified_approximation() -> None:
    layer = _conv(8, 20)  # a 3200 x 3200 operator: a dense SVD of several seconds
    registry = get_registry()
    assert registry.backend("exact").supports(layer, Request())
    assert registry.backend("exact").cost(layer, Request()) > EXACT_BUDGET_S
    backend, reason = choose_backend(layer, Request(), "auto", registry)
    assert backend is not None and backend.name == "toeplitz"
    assert reason.startswith("certified approx.; exact ~")
    huge = _conv(64, 56)  # too large for a dense matrix at all
    backend, reason = choose_backend(huge, Request(), "auto", registry)
    assert backend is not None and backend.name == "toeplitz"
    assert reason == "certified approx.; no exact fits"


def test_circular_padding_goes_to_the_circulant_backend() -> None:
    layer = _conv(64, 56)
    backend, reason = choose_backend(layer, Request(boundary="circular"), "auto",
                                     get_registry())
    assert backend is not None and backend.name == "fft-circulant"
    assert "cheapest exact" in reason


def test_top_k_is_always_exact() -> None:
    backend, reason = choose_backend(_conv(64, 56), Request(top_k=1), "auto", get_registry())
    assert backend is not None and backend.exact
    assert reason.startswith("top-1: cheapest exact")


def test_the_cheapest_exact_backend_wins_whoever_registered_it() -> None:
    layer = _conv(4, 8)
    backends = {"slow": _fake("slow", True, 1.0), "fast": _fake("fast", True, 0.001),
                "approx": _fake("approx", False, 0.0)}
    assert select_backend(layer, Request(), backends) == ("fast", "cheapest exact, <0.01s")


def test_ties_go_to_the_backend_registered_first() -> None:
    backends = {"first": _fake("first", True, 0.5), "second": _fake("second", True, 0.5)}
    assert select_backend(_conv(4, 8), Request(), backends)[0] == "first"


def test_over_budget_exact_loses_to_an_approximation_unless_top_k() -> None:
    backends = {"exact-slow": _fake("exact-slow", True, 10 * EXACT_BUDGET_S),
                "approx": _fake("approx", False, 1.0)}
    assert select_backend(_conv(4, 8), Request(), backends)[0] == "approx"
    assert select_backend(_conv(4, 8), Request(top_k=2), backends)[0] == "exact-slow"


def test_backends_without_a_cost_only_by_preference() -> None:
    backends = {"mystery": _fake("mystery", True, None), "known": _fake("known", True, 5.0)}
    assert select_backend(_conv(4, 8), Request(), backends)[0] == "known"
    chosen = select_backend(_conv(4, 8), Request(prefer=("mystery",)), backends)
    assert chosen == ("mystery", "preferred (--prefer mystery)")


def test_preference_order_skips_backends_that_cannot_answer() -> None:
    layer = _conv(4, 8)
    registry = get_registry()
    request = ProfileConfig(prefer=("fft-circulant", "toeplitz")).request(layer)
    backend, reason = choose_backend(layer, request, "auto", registry)
    # fft-circulant cannot answer zero padding with a 3x3 kernel: the next preference does
    assert backend is not None and backend.name == "toeplitz"
    assert reason == "preferred (--prefer toeplitz)"


def test_an_unknown_preferred_backend_is_a_clear_error() -> None:
    from specprof.engine.profile import validate_backends

    with pytest.raises(SpecprofError, match="unknown backend 'nope'"):
        validate_backends(("auto",), get_registry(), ("nope",))


def test_device_auto_is_resolved_once_in_the_request() -> None:
    config = ProfileConfig(device="auto")
    assert config.device in ("cpu", "cuda")
    assert config.request(_conv(4, 8)).device == config.device
    with pytest.raises(SpecprofError, match="tpu9"):
        ProfileConfig(device="tpu9")


def test_backend_parameters_are_merged_into_the_stored_ones() -> None:
    from specprof.engine.profile import compute_spectrum

    class WithMethod(Fake):
        name: ClassVar[str] = "with-method"

        def compute(self, layer: Layer, request: Request) -> Spectrum:
            return Spectrum(values=np.array([1.0]), kind="operator", backend=self.name,
                            exact=True, params={"method": "lanczos", "boundary": "wrong"},
                            complete=False)

    spectrum = compute_spectrum(WithMethod(), _conv(4, 8), Request(top_k=1))
    assert spectrum.params["method"] == "lanczos"
    assert spectrum.params["boundary"] == "zeros" and spectrum.params["top_k"] == 1


def test_the_stored_run_configuration_follows_its_schema() -> None:
    import jsonschema

    from specprof.schemas import load_schema

    schema = load_schema("profile-config")
    plain = ProfileConfig(device="auto").to_json()
    preferring = ProfileConfig(prefer=("toeplitz",), top_k=2).to_json()
    for config in (plain, preferring):
        jsonschema.validate(config, schema)
    assert "prefer" not in plain and preferring["prefer"] == ["toeplitz"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**plain, "device": "auto"}, schema)
