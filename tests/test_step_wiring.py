"""How a planned training step meets autograd: tangents made from autograd's
gradients of the outputs, and the backward's gradients handed back per primal."""

from __future__ import annotations

import torch

import planner
from planner.runtime.output_aliases import ForwardOutputs
from planner.step_wiring import StepWiring, with_strides


def _wiring() -> StepWiring:
    """One updated buffer (position 0), then two outputs taking tangents (1, 2);
    three primals: the first reached from tangent 0 only, the second from
    tangent 1 only, the third has no gradient."""
    return StepWiring(
        forward_outputs=ForwardOutputs(num_user=2, tangents=[0, 1]),
        tangent_positions=[1, 2],
        with_tangent=frozenset({1, 2}),
        tangent_strides=[(1, 2), (3, 1)],
        tangent_values=[((2, 2), torch.float32), ((2, 3), torch.float64)],
        grad_slots=[0, 1, None],
        tangents_of_grads=[0b01, 0b10, 0],
    )


def test_a_missing_output_gradient_becomes_zeros_laid_out_as_traced() -> None:
    wiring = _wiring()
    given = torch.ones(2, 2)  # contiguous, traced transposed: copied to (1, 2)
    tangents = wiring.tangents([None, given, None], torch.device("cpu"))
    assert tangents[0].stride() == (1, 2) and torch.equal(tangents[0], given)
    assert tangents[1].shape == (2, 3) and tangents[1].dtype == torch.float64
    assert tangents[1].stride() == (3, 1) and not tangents[1].any()


def test_a_gradient_no_given_tangent_reaches_is_left_none_as_eager_does() -> None:
    wiring = _wiring()
    grads = [torch.full((2,), 1.0), torch.full((2,), 2.0)]
    left_none = wiring.unreached([None, torch.ones(2, 2), None])
    assert left_none == frozenset({1})
    out = wiring.gradients(grads, left_none, [torch.device("cpu")] * 3)
    assert out[0] is grads[0] and out[1] is None and out[2] is None


def test_with_strides_copies_only_when_the_layout_differs() -> None:
    x = torch.randn(2, 3, 4, 5)
    assert with_strides(x, x.stride()) is x
    channels_last = x.contiguous(memory_format=torch.channels_last)
    y = with_strides(x, channels_last.stride())
    assert y.stride() == channels_last.stride() and torch.equal(y, x)
    one = torch.ones(1, 1)
    assert with_strides(one, (7, 7)) is one  # one element: any strides will do


def test_the_wiring_read_off_a_capture_gives_eager_gradients() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    x = torch.randn(3, 4)
    pm = planner.plan(model, "100%", example_inputs=(x,), mode="train")
    wiring = pm._wiring
    assert len(wiring.tangent_positions) == 1 and wiring.grad_slots[:4] == [0, 1, 2, 3]
    pm(x).sum().backward()
    planned = [p.grad for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    model(x).sum().backward()  # eager, on the same parameters
    for grad, p in zip(planned, model.parameters()):
        assert torch.equal(grad, p.grad)


class _NoDevice:
    """A gradient whose device must not be read."""

    @property
    def device(self) -> torch.device:
        raise AssertionError("a gradient's device was compared")


def test_gradients_on_the_backwards_device_are_handed_back_without_a_comparison() -> None:
    """``devices`` None (no primal off the plan's device): the list is built
    directly, no device compared; given, a gradient off its primal's device moves."""
    wiring = _wiring()
    grads = [_NoDevice(), _NoDevice()]
    out = wiring.gradients(grads, frozenset({1}), None)  # type: ignore[arg-type]
    assert out[0] is grads[0] and out[1] is None and out[2] is None
    moved = wiring.gradients(
        [torch.ones(2), torch.ones(2)], frozenset(), [torch.device("meta")] * 2 + [None]
    )
    assert moved[0].device.type == "meta" and moved[1].device.type == "meta"


def test_a_plan_on_one_device_records_no_devices_per_step(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Whether a gradient can move is decided once per plan: a CPU plan's step
    gives the wiring no devices (it compared each parameter's every step), and
    its gradients are eager's."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    eager = __import__("copy").deepcopy(model)
    x = torch.randn(3, 4, requires_grad=True)
    pm = planner.plan(model, "100%", example_inputs=(x,), mode="train")
    assert pm._gradients_move is False
    given = []
    plain = StepWiring.gradients

    def recording(self, grads, left_none, devices):  # type: ignore[no-untyped-def]
        given.append(devices)
        return plain(self, grads, left_none, devices)

    monkeypatch.setattr(StepWiring, "gradients", recording)
    pm(x).sum().backward()
    assert given == [None]
    planned = [p.grad for p in model.parameters()] + [x.grad]
    x.grad = None
    eager(x).sum().backward()
    for grad, expected in zip(planned, [p.grad for p in eager.parameters()] + [x.grad]):
        assert torch.equal(grad, expected)
    pm.close()
