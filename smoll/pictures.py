"""Pictures: the loss curve train.py draws beside its weights, and the attention maps of
play.py --attention. matplotlib is optional: it is imported only when a picture is drawn.
"""

import os

from smoll.files import SmollError, replaced_atomically


def import_pyplot():
    try:
        import matplotlib
    except ImportError:
        raise SmollError("drawing pictures needs matplotlib: `pip install matplotlib`.") from None
    matplotlib.use("Agg")  # draw to files; no window needed
    import matplotlib.pyplot as plt
    return plt


def plot_history(history, path, title=""):
    """Draw train and val loss against the step, and save it as a PNG."""
    plt = import_pyplot()
    steps = [h["step"] for h in history]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120, layout="constrained")
    ax.plot(steps, [h["train_loss"] for h in history], marker=".", label="train")
    ax.plot(steps, [h["val_loss"] for h in history], marker=".", label="val")
    best = min(history, key=lambda h: h["val_loss"])
    ax.scatter([best["step"]], [best["val_loss"]], marker="*", s=150, color="C1", zorder=3,
               label=f"best val {best['val_loss']:.3f} (step {best['step']})")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per character)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(plt, fig, path)


def save_figure(plt, fig, path):
    """Save a figure (its format from path's extension, PNG without one) through a temp file
    renamed into place, so a failed write leaves any earlier picture whole; close it whatever happens."""
    kind = os.path.splitext(path)[1][1:].lower() or "png"
    try:
        with replaced_atomically(path, "." + kind) as f:
            fig.savefig(f, format=kind)
    finally:
        plt.close(fig)


def plot_attention(maps, chars, path, title=""):
    """Draw attention maps (n_layer, n_head, T, T) as a grid of heatmaps, one per layer and head.

    Row t of a panel shows how much the character at t attends to each earlier character.
    """
    plt = import_pyplot()
    n_layer, n_head, T, _ = maps.shape
    size = 1.2 + 0.12 * T  # inches per panel, so the tick labels stay readable
    fig, axes = plt.subplots(n_layer, n_head, figsize=(size * n_head, size * n_layer), dpi=100,
                             squeeze=False, layout="constrained")
    labels = ["␣" if c == " " else repr(c)[1:-1] if c.isspace() else c for c in chars]  # "\n" shows
    for layer in range(n_layer):
        for head in range(n_head):
            ax = axes[layer][head]
            ax.imshow(maps[layer, head].float().cpu().numpy(), cmap="viridis", vmin=0, vmax=1)
            ax.set_xticks(range(T), labels, fontsize=7)
            ax.set_yticks(range(T), labels, fontsize=7)
            ax.set_title(f"layer {layer + 1}, head {head + 1}", fontsize=9)
    fig.suptitle(title)
    save_figure(plt, fig, path)
