"""Which FAM processor replaces which diffusers processor (the "fused" path). A layer whose processor
is not here takes the hook path where :data:`srdiff.processors.families.HOOK_LAYOUTS` lays its family
out, and is refused otherwise: installing something that behaves differently outside the modulation
is never an option."""

from srdiff.processors.flux import FAMFluxAttnProcessor
from srdiff.processors.flux2 import FAMFlux2AttnProcessor, FAMFlux2ParallelSelfAttnProcessor
from srdiff.processors.hidream import FAMHiDreamAttnProcessor
from srdiff.processors.joint import FAMJointAttnProcessor
from srdiff.processors.lumina2 import FAMLumina2AttnProcessor
from srdiff.processors.pag import FAMPAGAttnProcessor
from srdiff.processors.qwenimage import FAMQwenDoubleStreamAttnProcessor
from srdiff.processors.sana import FAMSanaLinearAttnProcessor
from srdiff.processors.self_attention import FAMAttnProcessor

FUSED = (FAMAttnProcessor, FAMPAGAttnProcessor, FAMJointAttnProcessor, FAMFluxAttnProcessor, FAMFlux2AttnProcessor,
         FAMFlux2ParallelSelfAttnProcessor, FAMQwenDoubleStreamAttnProcessor, FAMSanaLinearAttnProcessor,
         FAMHiDreamAttnProcessor, FAMLumina2AttnProcessor)

# qualified name of the diffusers processor class -> the FAM processor that replaces it (each FAM
# processor lists what it replaces in its ``replaces``; a new family is one class added to FUSED)
FAM_PROCESSORS: dict[str, type] = {name: cls for cls in FUSED for name in cls.replaces}


def qualified_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"
