"""The flaw highlighter (real/fake classifier + Grad-CAM flaw activation maps), its training, and the
planted-artifact benchmark that checks its maps point at flaws."""

from srdiff.highlighter.model import FlawHighlighter

__all__ = ["FlawHighlighter"]
