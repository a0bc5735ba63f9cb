"""Which FAM processor replaces which diffusers processor. A layer whose processor is not here is
refused by :func:`srdiff.set_fam_attn_processor` (or skipped and reported with ``strict=False``):
installing something that behaves differently outside the modulation is never an option."""

from srdiff.processors.flux import FAMFluxAttnProcessor
from srdiff.processors.joint import FAMJointAttnProcessor
from srdiff.processors.self_attention import FAMAttnProcessor

# qualified name of the diffusers processor class -> the FAM processor that replaces it (each FAM
# processor lists what it replaces in its ``replaces``; a new family is one class added here)
FAM_PROCESSORS: dict[str, type] = {
    name: cls for cls in (FAMAttnProcessor, FAMJointAttnProcessor, FAMFluxAttnProcessor) for name in cls.replaces
}


def qualified_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def fam_processor_for(processor) -> type | None:
    """The FAM processor class for a layer currently running ``processor``, or None."""
    return FAM_PROCESSORS.get(qualified_name(type(processor)))
