"""The one device resolver: a ``--device`` / ``device=`` name as a ``torch.device`` this machine has."""

import torch


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """``"auto"`` or None: CUDA where available, else the CPU. Any other name (``"cpu"``, ``"cuda"``,
    ``"cuda:1"``, ``"mps"``, ...) as given, or ``ValueError`` naming it where torch cannot parse it or this
    machine does not have it (``--device cuda`` without a GPU), before any file is read or written."""
    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device {str(name)!r} is not a device name ('auto', 'cpu', 'cuda', 'cuda:N', ...): "
                         f"{str(exc).splitlines()[0]}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(name)!r} requested but CUDA is not available on this machine (torch "
                             f"{torch.__version__}, built for CUDA {torch.version.cuda}): use 'cpu' or 'auto'")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {str(name)!r} requested but this machine has {torch.cuda.device_count()} "
                             "CUDA device(s)")
    elif device.type != "cpu":
        try:
            torch.empty(0, device=device)
        except RuntimeError as exc:
            raise ValueError(f"device {str(name)!r} is not available on this machine: "
                             f"{str(exc).splitlines()[0]}") from None
    return device
