"""Training a flaw highlighter on real vs fake images, and the metrics it reports.

The recipe starts from the authors' (AdamW with betas (0.5, 0.999), a one-cycle schedule, a 90/10
split, the checkpoint with the best validation balanced accuracy kept) and adds what the planted-
artifact study settled at 32 px (docs/highlighter.md): batches half real, half fake whatever the class
sizes, flips but no translations, and a learning rate for training from scratch (2e-3).
"""

import math

import torch
import torch.nn.functional as F

from srdiff._checks import check_int
from srdiff.highlighter.images import resize_square


def roc_auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC curve (the Mann-Whitney statistic; ties count one half). NaN if one class is absent."""
    pos, neg = scores[labels == 1].double(), scores[labels == 0].double()
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).double().sum() + 0.5 * (pos[:, None] == neg[None, :]).double().sum()
    return (greater / (len(pos) * len(neg))).item()


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict:
    """loss, accuracy, balanced accuracy (mean of per-class recalls) and ROC-AUC of (N, 2) logits."""
    pred = logits.argmax(dim=1)
    recalls = [(pred[labels == c] == c).float().mean().item() for c in (0, 1) if bool((labels == c).any())]
    return {
        "loss": F.cross_entropy(logits.float(), labels).item(),
        "accuracy": (pred == labels).float().mean().item(),
        "balanced_accuracy": sum(recalls) / len(recalls),
        "roc_auc": roc_auc(logits[:, 1] - logits[:, 0], labels),
    }


def augment(x: torch.Tensor, *, shift: int, flip: bool, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random horizontal flips (if ``flip``) and integer translations of up to ``shift`` pixels
    (reflected borders) of a (B, C, H, W) batch."""
    B, _, H, W = x.shape
    if flip:
        flips = (torch.rand(B, generator=generator) < 0.5).to(x.device)
        x = torch.where(flips[:, None, None, None], x.flip(-1), x)
    if shift == 0:
        return x
    padded = F.pad(x, (shift, shift, shift, shift), mode="reflect")
    dy, dx = torch.randint(0, 2 * shift + 1, (2, B), generator=generator).to(x.device)
    rows = (dy[:, None] + torch.arange(H, device=x.device))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(W, device=x.device))[:, None, None, :]
    batch = torch.arange(B, device=x.device)[:, None, None, None]
    chan = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    return padded[batch, chan, rows, cols]


def _split(n: int, val_fraction: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    order = torch.randperm(n, generator=generator)
    n_val = max(1, int(round(val_fraction * n))) if val_fraction > 0 else 0
    return order[n_val:], order[:n_val]


@torch.no_grad()
def evaluate(model, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 256) -> dict:
    """:func:`classification_metrics` of ``model`` on (images, labels), in eval mode (restored after)."""
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        logits = torch.cat([model(chunk.to(device)) for chunk in images.split(batch_size)]).float().cpu()
    finally:
        model.train(was_training)
    return classification_metrics(logits, labels.cpu())


def fit(
    model,
    real: torch.Tensor,
    fake: torch.Tensor,
    *,
    epochs: int | None = None,
    steps: int | None = None,
    batch_size: int = 64,
    lr: float = 2e-3,
    weight_decay: float = 1e-2,
    betas: tuple[float, float] = (0.5, 0.999),
    val_fraction: float = 0.1,
    shift: int = 0,
    flip: bool = True,
    patience: int | None = 8,
    seed: int | None = None,
    progress: bool = True,
) -> list[dict]:
    """Train ``model`` (a :class:`~srdiff.highlighter.FlawHighlighter`) on real (0) vs fake (1) images.

    Args:
        real, fake: (N, C, H, W) floating tensors in [0, 1], C the model's ``in_channels``, any H, W
            (resized to the model's size), on any device (batches move to the model's device).
        epochs: full runs: a one-cycle learning-rate schedule over ``epochs`` epochs, validation after
            each, the weights with the best validation balanced accuracy (ties: lower loss) restored at
            the end, early stop after ``patience`` epochs without improvement (``None``: never).
            Default 30 when neither ``epochs`` nor ``steps`` is given.
        steps: short fine-tunes (the trainer's, on fresh samples every cycle): exactly ``steps``
            optimizer steps at constant ``lr``, one validation at the end, the final weights kept.
        batch_size: images per step, half real and half fake (balanced whatever the class sizes; an
            epoch is enough steps to see the larger class once).
        lr, weight_decay, betas: AdamW (betas (0.5, 0.999) as in the authors' code); ``lr`` is the
            one-cycle peak.
        val_fraction: held out per class for validation (at least one image each).
        shift, flip: augmentation of training batches: random translations up to ``shift`` pixels
            (at the model's size, reflected borders) and horizontal flips. Both keep the label (a
            crop could cut the flaw out of a fake). Default flips only: on planted digits, flips
            plus 2 px translations pointed at warps 0.94 / 0.93 of the time (two seeds), flips alone
            0.99 / 0.95.
        seed: seeds the split, the batch order and the augmentation (model init is the caller's).
        progress: a tqdm bar per epoch.

    Returns:
        One dict per epoch (one for ``steps``): ``epoch``, ``steps``, ``lr``, ``train_loss`` and the
        validation ``loss``, ``accuracy``, ``balanced_accuracy``, ``roc_auc``.
    """
    model.check_images(real, "real")
    model.check_images(fake, "fake")
    if epochs is not None and steps is not None:
        raise ValueError(f"give epochs or steps, not both (got epochs={epochs}, steps={steps})")
    for name, value in (("epochs", epochs), ("steps", steps), ("batch_size", batch_size)):
        if value is not None:
            check_int(name, value, 1)
    if batch_size < 2:
        raise ValueError(f"batch_size must be >= 2 (half real, half fake), got {batch_size}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if len(real) < 2 or len(fake) < 2:
        raise ValueError(f"need at least 2 real and 2 fake images, got {len(real)} real and {len(fake)} fake")
    check_int("shift", shift, 0)
    if shift >= model.image_size:
        raise ValueError(f"shift must be an int in [0, image_size), got {shift!r}")
    if epochs is None and steps is None:
        epochs = 30

    generator = torch.Generator().manual_seed(seed if seed is not None else int(torch.randint(2**62, ()).item()))
    device = next(model.parameters()).device
    real, fake = resize_square(real.float(), model.image_size), resize_square(fake.float(), model.image_size)
    (real_tr, real_val), (fake_tr, fake_val) = _split(len(real), val_fraction, generator), _split(len(fake), val_fraction, generator)
    val_images = torch.cat([real[real_val], fake[fake_val]])
    val_labels = torch.cat([torch.zeros(len(real_val), dtype=torch.long), torch.ones(len(fake_val), dtype=torch.long)])
    real, fake = real[real_tr], fake[fake_tr]

    half = batch_size // 2
    steps_per_epoch = math.ceil(max(len(real), len(fake)) / half)
    total = steps if steps is not None else epochs * steps_per_epoch
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=betas, weight_decay=weight_decay)
    if steps is None:
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=total)
    labels = torch.cat([torch.zeros(half, dtype=torch.long), torch.ones(batch_size - half, dtype=torch.long)]).to(device)
    draws = {"real": _Cycler(len(real), generator), "fake": _Cycler(len(fake), generator)}

    history, best, best_key, since_best, done = [], None, None, 0, 0
    n_epochs = 1 if steps is not None else epochs
    for epoch in range(1, n_epochs + 1):
        n_steps = steps if steps is not None else steps_per_epoch
        model.train()
        running = 0.0
        bar = _progress(n_steps, f"epoch {epoch}/{n_epochs}" if steps is None else "fine-tune", progress)
        for _ in range(n_steps):
            x = torch.cat([real[draws["real"].take(half)], fake[draws["fake"].take(batch_size - half)]]).to(device)
            x = augment(x, shift=shift, flip=flip, generator=generator)
            loss = F.cross_entropy(model(x), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if steps is None:
                schedule.step()
            running += loss.item()
            done += 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.4f}")
        if bar is not None:
            bar.close()
        record = {"epoch": epoch, "steps": done, "lr": optimizer.param_groups[0]["lr"], "train_loss": running / n_steps}
        if len(val_labels):
            record.update(evaluate(model, val_images, val_labels))
        history.append(record)
        if steps is not None or not len(val_labels):
            continue
        key = (record["balanced_accuracy"], -record["loss"])
        if best_key is None or key > best_key:
            best_key, since_best = key, 0
            best = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            since_best += 1
            if patience is not None and since_best >= patience:
                break
    if best is not None:
        model.load_state_dict(best)
    model.eval()
    return history


class _Cycler:
    """Indices 0..n-1 in a fresh random order each pass, drawn ``k`` at a time across pass boundaries."""

    def __init__(self, n: int, generator: torch.Generator):
        self.n, self.generator = n, generator
        self.order, self.pos = torch.randperm(n, generator=generator), 0

    def take(self, k: int) -> torch.Tensor:
        out = []
        while k > 0:
            if self.pos == self.n:
                self.order, self.pos = torch.randperm(self.n, generator=self.generator), 0
            got = self.order[self.pos : self.pos + k]
            self.pos += len(got)
            k -= len(got)
            out.append(got)
        return torch.cat(out)


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False)
