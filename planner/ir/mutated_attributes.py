"""A forward that updates a plain tensor attribute in place is refused, and the
attribute is put back as it was.

A step counter kept as ``self.count = torch.zeros((), dtype=torch.int64)`` (not
``register_buffer``) and advanced by ``self.count += 1`` in forward: tracing ran
the update on the real tensor, so planning advanced the model's counter, and the
training trace then made the counter a constant of the value it had after that
update. Every planned step read it one ahead of eager's and the loss and every
gradient differed, silently (found by the adversarial sweep). Inference failed
with torch's own "Constant count is mutated in the forward method" from deep
inside its decompositions. A buffer is state the plan carries from call to call;
a plain attribute is not, so the fix is the user's: register it as a buffer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from planner.errors import CaptureError

#: attributes up to this size are copied before the trace, so an update the trace
#: made can be undone (a counter, a scale); a larger one is only reported
_RESTORED_BYTES = 1 << 20


def _plain_tensors(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Tensors held as plain attributes of ``model``'s modules: neither
    parameters nor buffers, by qualified name."""
    found = []
    for prefix, module in model.named_modules():
        for name, value in vars(module).items():
            if isinstance(value, torch.Tensor) and not isinstance(value, torch.nn.Parameter):
                found.append((f"{prefix}.{name}" if prefix else name, value))
    return found


@contextlib.contextmanager
def plain_attributes_left_alone(model: torch.nn.Module) -> Iterator[None]:
    """Run the block (the trace); if it wrote into a plain tensor attribute, put
    back what can be put back and raise a CaptureError naming it."""
    watched = [
        (name, t, t._version, t.detach().clone() if t.nbytes <= _RESTORED_BYTES else None)
        for name, t in _plain_tensors(model)
        if t.layout is torch.strided and not t.is_meta and not t.is_inference()
    ]

    def undo() -> list[str]:
        written = []
        for name, t, version, before in watched:
            if t._version != version:
                written.append(name)
                if before is not None:
                    with torch.no_grad():
                        t.copy_(before)
        return written

    try:
        yield
    except BaseException:
        undo()
        raise
    written = undo()
    if written:
        listed = ", ".join(written)
        raise CaptureError(
            f"{type(model).__name__}'s forward updates {listed} in place, a plain tensor "
            f"attribute{'s' if len(written) > 1 else ''}, not a registered buffer: a plan "
            f"carries buffers from call to call, but would fix a plain attribute at the value "
            f"it had when planned. Register it as a buffer: "
            f"self.register_buffer({written[0].rpartition('.')[2]!r}, tensor)"
        )
