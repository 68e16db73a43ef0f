"""One line per shipped strategy, what `distillkit list strategies` shows: each strategy class's `summary` is
its line here, so the listing loads no torch (a strategy of your own sets `summary` on its class)."""

SUMMARIES = {
    "agglomerate": (
        "AM-RADIO/UNIC multi-teacher distillation: per teacher, adaptor heads regress its PHI-S-standardised "
        "pooled embedding and token map (every teacher role by default; optional teacher dropping)"
    ),
    "bootleg": (
        "Bootleg pretraining (distillkit pretrain bootleg): a ViT predicts its own EMA copy's normalised hidden "
        "layers at masked blocks (I-JEPA masks and predictor; no teacher)"
    ),
    "dense": (
        "multi-scale dense distillation (AM-RADIO/FitNets): per student stage a 1x1 conv regresses one teacher's "
        "standardised token map resampled to that stage's grid (CNNs: strides 8, 16, 32)"
    ),
    "feature": "timm-style feature distillation: Linear(student embedding) -> teacher embedding, cosine or MSE",
    "hidden": (
        "multi-hidden-layer regression (Bootleg/I-JEPA): predict normalised teacher layers; masked "
        "context + predictor for ViT students"
    ),
    "hybrid": (
        "Hybrid Distill: a MIM teacher's token relations at intermediate layers + a CL teacher's final "
        "features, with progressive redundant-token masking (two teachers)"
    ),
    "kdss": (
        "KDSS/SSKD: KD on upright and rotated images, rotation similarity transfer, feature-map "
        "cosine (4 rotations per view)"
    ),
    "logits": "Hinton KD: T^2 KL between softened teacher and student class distributions (needs teacher logits)",
    "sdssl": (
        "SDSSL: every student block, through its own projector, contrasts with the teacher's final "
        "embedding (InfoNCE); intermediate blocks ramp in"
    ),
    "seed": "SEED: match the teacher's similarity distribution over a queue of teacher embeddings",
    "simclr": "SimCLR: the student alone, NT-Xent between two views (no teacher; the self-supervised baseline)",
}
