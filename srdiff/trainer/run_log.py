"""The run's metrics log (``metrics.jsonl``: one record per step, plus refresh and checkpoint events) and
the loss plot drawn from it."""

import json
from pathlib import Path

import torch


class RunLog:
    """Appends JSON records to ``out_dir/metrics.jsonl`` (rank 0 opens it; other ranks write nothing)."""

    def __init__(self, out_dir: str | Path):
        self.path = Path(out_dir) / "metrics.jsonl"
        self._file = None

    def open(self, *, resumed_at: int | None) -> None:
        """Start writing: continue after step ``resumed_at`` (dropping records written after that
        checkpoint), or start a new log when None."""
        if resumed_at is not None:
            self._trim(resumed_at)
        else:
            self.path.unlink(missing_ok=True)
        self._file = self.path.open("a")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def write(self, record: dict) -> None:
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()

    def records(self) -> list[dict]:
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def _trim(self, step: int) -> None:
        """Drop records past the resumed step (written after the checkpoint, before the interruption)."""
        if not self.path.is_file():
            return

        def before_resume(record: dict) -> bool:
            # a refresh logged at step s ran before step s + 1, after the checkpoint of step s
            return record["step"] < step if record.get("event") == "refresh" else record["step"] <= step

        lines = [line for line in self.path.read_text().splitlines() if line.strip()]
        self.path.write_text("".join(line + "\n" for line in lines if before_resume(json.loads(line))))

    def plot_loss(self, out: str | Path, *, base_steps: int, steps: int, title: str) -> Path:
        """A PNG of the per-step loss (and its moving average) with the phase switch and refreshes marked."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        records = self.records()
        steps_seen = [r["step"] for r in records if "loss" in r]
        losses = [r["loss"] for r in records if "loss" in r]
        refreshes = [r["step"] for r in records if r.get("event") == "refresh"]
        fig, ax = plt.subplots(figsize=(7, 3.5))
        ax.plot(steps_seen, losses, lw=0.6, alpha=0.4, label="loss")
        if len(losses) >= 20:
            w = max(10, len(losses) // 50)
            kernel = torch.ones(w) / w
            smooth = torch.nn.functional.conv1d(torch.tensor(losses)[None, None], kernel[None, None]).flatten()
            ax.plot(steps_seen[w - 1:], smooth.tolist(), lw=1.5, label=f"mean of {w}")
        if base_steps < steps:
            ax.axvline(base_steps, color="k", ls="--", lw=1, label="refinement starts")
        for i, s in enumerate(refreshes):
            ax.axvline(s, color="tab:red", lw=0.5, alpha=0.5, label="mFAM refresh" if i == 0 else None)
        ax.set(xlabel="step", ylabel="loss", yscale="log", title=title)
        ax.legend(loc="upper right", fontsize=8)
        fig.tight_layout()
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=120)
        plt.close(fig)
        return out
