"""Region sources behind one interface: B frames (and, for "given", their boxes) -> Regions padded to K.

- "detector": torchvision Faster R-CNN. Boxes are chosen as bottom-up attention does (per-class NMS,
  a score threshold on each proposal's best class, min..max boxes per frame, or a fixed K); the feature
  of each kept box is the 1024-d box-head representation of the FINAL box (the RoI pooler and box head
  are run again on the kept, regressed boxes, not reused from the proposals). Checkpoints load by
  torchvision's key names with any class count (`build_detector`); the detector sees frames at the decode
  scale and never resizes them again (`FixedScaleTransform`).
- "given": boxes supplied per frame (e.g. the demo corpus's ground truth); class = object index.
- "grid": a fixed grid of boxes; class = cell index.
"given" and "grid" compute features with the backbone the config names: the detector's FPN + box head
(1024-d), or the frame encoder's EfficientNet-Lite0 feature map with RoIAlign and average pooling.

A detectron2 model (e.g. bottom-up attention R101-C4) plugs in as one more RegionSource: see
docs/extractors.md.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import batched_nms, nms, roi_align

from extractors.api import Clip, Regions
from extractors.config import RegionConfig
from extractors.encoders import Runtime, build_trunk, seeded, to_batch, weight_file
from extractors.weights import check_and_load, read_weights

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- RoI featurisers (boxes -> features)


CLS_SCORE_KEY = "roi_heads.box_predictor.cls_score.weight"  # [num_classes (incl. background), 1024 or 256]


class FixedScaleTransform(GeneralizedRCNNTransform):
    """torchvision's detector transform without its resize: frames arrive at the one configured scale
    (decoded at sampling.short_side / max_side), so they are normalised and batched, never resized again."""

    def resize(self, image, target=None):
        return image, target


EFFICIENTNET_DETECTOR = "fasterrcnn_efficientnet_lite0_fpn"  # built here from torchvision's detection parts


def fasterrcnn_efficientnet_lite0_fpn(*, weights: None = None, weights_backbone: str | None = None,
                                      num_classes: int = 91, **kwargs) -> nn.Module:
    """Faster R-CNN for small objects in small frames, from torchvision's detection parts, with the
    builder signature of torchvision's (kwargs go to FasterRCNN).

    - Trunk: timm's EfficientNet-Lite0 stem and stages 0-4 (up to stride 16; the frame encoder's
      network), BatchNorm frozen (few frames per batch). `weights_backbone`: its ImageNet weights
      ("pkg:efficientnet_lite0"); None = random init, seeded by the caller (a checkpoint then overwrites it).
    - FPN (torchvision BackboneWithFPN) over the stride-8 and stride-16 stages, 64 channels, plus
      torchvision's max-pool level (stride 32).
    - Anchors fit for 10..100 px objects: 16/24 px on stride 8, 32/48 on stride 16, 64/96 on stride 32,
      aspect ratios 0.5, 1, 2 (torchvision's start at 32 px, larger than most demo objects).
    - Box head: RoIAlign 7x7 on the stride-8/16 levels, a 256-d two-layer MLP (torchvision's 1024-d
      head over 256 FPN channels is 13M weights, most of a step's cost here).
    The anchors are part of the architecture, not of the checkpoint: they are fixed here so that a
    checkpoint always runs with the anchors it was trained with.
    """
    from collections import OrderedDict

    from timm.layers import freeze_batch_norm_2d
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.ops import MultiScaleRoIAlign

    if weights is not None:
        raise ValueError(f"{EFFICIENTNET_DETECTOR} has no published weights: load a checkpoint by key names")
    if weights_backbone is not None:
        net, _ = build_trunk("efficientnet_lite0", 224, weights_backbone, seed=0)  # seed: only its dropped classifier
    else:
        import timm

        net = timm.create_model("efficientnet_lite0", pretrained=False, num_classes=0)  # the caller seeds
    body = nn.Sequential(OrderedDict([("stem", nn.Sequential(net.conv_stem, net.bn1)),
                                      *((f"stage{i}", net.blocks[i]) for i in range(5))]))
    body = freeze_batch_norm_2d(body)
    channels, representation = 64, 256
    backbone = BackboneWithFPN(body, {"stage2": "0", "stage4": "1"}, [40, 112], channels)  # + "pool"
    anchors = AnchorGenerator(((16, 24), (32, 48), (64, 96)), ((0.5, 1.0, 2.0),) * 3)
    return FasterRCNN(
        backbone, rpn_anchor_generator=anchors,
        box_roi_pool=MultiScaleRoIAlign(["0", "1"], output_size=7, sampling_ratio=2),
        box_head=TwoMLPHead(channels * 7 * 7, representation),
        box_predictor=FastRCNNPredictor(representation, num_classes),
        min_size=128, max_size=1333, **kwargs)  # sizes unused: frames are never resized (single_scale)


def detector_builder(name: str):
    """The builder of detector `name`: torchvision's, or one built here (EFFICIENTNET_DETECTOR)."""
    import torchvision

    if name == EFFICIENTNET_DETECTOR:
        return fasterrcnn_efficientnet_lite0_fpn
    return getattr(torchvision.models.detection, name)


def build_detector(name: str, weights: str, seed: int, allow_random: bool = False, proposals: int = 0) -> nn.Module:
    """Faster R-CNN `name` (regions.detector) with a checkpoint loaded by its key names (torchvision's).

    The class count is read from the checkpoint's box predictor (COCO 91, Visual Genome 1601, a
    fine-tuned demo detector ...). A checkpoint for another architecture or with missing keys is
    refused (extractors.weights.check_and_load); keys the model does not use are reported and ignored.
    `proposals` > 0: RPN proposals kept per frame at inference (changes no state-dict key).
    """
    path = weight_file(weights, name, seed, allow_random)
    state = read_weights(path) if path is not None else {}
    num_classes = int(state[CLS_SCORE_KEY].shape[0]) if CLS_SCORE_KEY in state else 91
    with seeded(seed):
        model = detector_builder(name)(weights=None, weights_backbone=None, num_classes=num_classes,
                                       **proposal_kwargs(proposals))
    if path is not None:
        check_and_load(model, state, path, name)
        log.info("%s: %d classes (from %s)", name, num_classes, path.name)
    return model


def proposal_kwargs(proposals: int) -> dict[str, int]:
    """Builder arguments that make the RPN keep `proposals` per frame at inference (0 = the builder's)."""
    return {"rpn_pre_nms_top_n_test": proposals, "rpn_post_nms_top_n_test": proposals} if proposals else {}


def single_scale(model: nn.Module) -> nn.Module:
    """`model` with its transform replaced by FixedScaleTransform (same normalisation and padding)."""
    t = model.transform
    model.transform = FixedScaleTransform(t.min_size, t.max_size, t.image_mean, t.image_std,
                                          size_divisible=t.size_divisible, fixed_size=t.fixed_size)
    return model


class DetectorBackbone:
    """torchvision Faster R-CNN parts: transform, FPN backbone, RPN, RoI pooler, box head, predictor."""

    def __init__(self, cfg: RegionConfig, runtime: Runtime, allow_random: bool = False,
                 model: nn.Module | None = None) -> None:
        """`model`: an already built torchvision Faster R-CNN to use instead of cfg.weights."""
        if model is None:
            model = build_detector(cfg.detector, cfg.weights, cfg.seed, allow_random, cfg.proposals)
        self.model = runtime.prepare(single_scale(model))
        self.runtime = runtime
        self.dim = model.roi_heads.box_predictor.cls_score.in_features  # the box-head representation (1024, 256)

    def features(self, frames: list[np.ndarray]):
        """-> (ImageList, FPN feature maps, scale [B, 2] from frame pixels to transformed pixels (x, y))."""
        images = [torch.from_numpy(np.ascontiguousarray(f)).to(self.runtime.device).permute(2, 0, 1).float() / 255.0
                  for f in frames]
        image_list, _ = self.model.transform(images)
        tensors = self.runtime.input(image_list.tensors)
        feats = self.model.backbone(tensors)
        scale = torch.tensor(
            [[s[1] / f.shape[1], s[0] / f.shape[0]] for s, f in zip(image_list.image_sizes, frames)],
            device=self.runtime.device,
        )  # [B, 2]
        return image_list, feats, scale

    def box_features(self, feats, boxes: list[torch.Tensor], image_sizes) -> torch.Tensor:
        """boxes: B x [n_b, 4] in transformed pixels -> [sum n_b, 1024] box-head representations."""
        heads = self.model.roi_heads
        return heads.box_head(heads.box_roi_pool(feats, boxes, image_sizes))


class DetectorRoIFeatures:
    """Features of given pixel boxes through the detector's FPN, RoI pooler and box head (1024-d)."""

    def __init__(self, backbone: DetectorBackbone) -> None:
        self.backbone = backbone
        self.dim = backbone.dim

    def __call__(self, frames: list[np.ndarray], boxes: list[np.ndarray]) -> list[np.ndarray]:
        image_list, feats, scale = self.backbone.features(frames)
        device = scale.device
        tboxes = [torch.from_numpy(b).float().to(device) * scale[i].repeat(2) for i, b in enumerate(boxes)]
        x = self.backbone.box_features(feats, tboxes, image_list.image_sizes).float().cpu().numpy()
        return np.split(x, np.cumsum([len(b) for b in boxes])[:-1])  # B x [n_b, 1024]


class TrunkRoIFeatures:
    """Features of given pixel boxes from an EfficientNet trunk: RoIAlign on its feature maps, average pool.

    levels="multi" concatenates the RoIs of the stride-32 head map (1280) with the stride-16 (112) and
    stride-8 (40) block outputs: 1432-d. The head map alone loses colour (a linear probe on demo-corpus
    objects reads colour at 0.65 from it, 0.96 from the three levels; shape 0.89 vs 0.95), which the
    trainer needs. Frames are squashed to region_input_size^2 so the whole frame (no crop) is seen.
    """

    # timm efficientnet_lite0 block stages whose outputs are the stride-8 and stride-16 maps
    STRIDE8_STAGE, STRIDE16_STAGE = 2, 4

    def __init__(self, trunk: nn.Module, head_dim: int, cfg: RegionConfig, runtime: Runtime) -> None:
        self.trunk, self.cfg, self.runtime = trunk, cfg, runtime
        self.head_dim = head_dim
        extra = 0
        if cfg.levels == "multi":
            extra = sum(_out_channels(trunk.blocks[i]) for i in (self.STRIDE16_STAGE, self.STRIDE8_STAGE))
        self.dim = head_dim + extra

    def feature_maps(self, frames: list[np.ndarray]) -> list[torch.Tensor]:
        """[head [B, 1280, s/32, s/32], (stride 16 [B, 112, ..], stride 8 [B, 40, ..]) if levels == multi]."""
        x = self.runtime.input(to_batch(frames, self.cfg.region_input_size, crop=False, device=self.runtime.device))
        t = self.trunk
        h = t.bn1(t.conv_stem(x))
        taps = {}
        for i, block in enumerate(t.blocks):
            h = block(h)
            taps[i] = h
        head = t.bn2(t.conv_head(h))
        if self.cfg.levels != "multi":
            return [head]
        return [head, taps[self.STRIDE16_STAGE], taps[self.STRIDE8_STAGE]]

    def pool(self, maps: list[torch.Tensor], frames: list[np.ndarray], boxes: list[np.ndarray]) -> list[np.ndarray]:
        size = self.cfg.region_input_size
        device = maps[0].device
        rois = []
        for i, (frame, b) in enumerate(zip(frames, boxes)):
            sx, sy = size / frame.shape[1], size / frame.shape[0]
            t = torch.from_numpy(b).float().to(device) * torch.tensor([sx, sy, sx, sy], device=device)
            rois.append(torch.cat([torch.full((len(b), 1), float(i), device=device), t], dim=1))
        rois = torch.cat(rois) if rois else torch.zeros((0, 5), device=device)  # [R, 5] (frame, x1, y1, x2, y2)
        r = self.cfg.roi_size
        parts = [
            roi_align(m.float(), rois, output_size=(r, r), spatial_scale=m.shape[-1] / size,
                      sampling_ratio=2, aligned=True).mean(dim=(2, 3))  # [R, C_level]
            for m in maps
        ]
        x = torch.cat(parts, dim=1).cpu().numpy()  # [R, Dr]
        return np.split(x, np.cumsum([len(b) for b in boxes])[:-1])

    def __call__(self, frames: list[np.ndarray], boxes: list[np.ndarray]) -> list[np.ndarray]:
        return self.pool(self.feature_maps(frames), frames, boxes)


def _out_channels(stage: nn.Module) -> int:
    convs = [m for m in stage.modules() if isinstance(m, nn.Conv2d)]
    return convs[-1].out_channels


# ---------------------------------------------------------------- padding


def pad_regions(
    boxes: list[np.ndarray], scores: list[np.ndarray], classes: list[np.ndarray], feats: list[np.ndarray],
    frames: list[np.ndarray], k: int, dim: int,
) -> Regions:
    """Per-frame variable-length results (pixel boxes) -> Regions padded to K (classes -1, zero features)."""
    n = len(frames)
    out = Regions(
        boxes=np.zeros((n, k, 4), np.float32),
        scores=np.zeros((n, k), np.float32),
        classes=np.full((n, k), -1, np.int64),
        counts=np.zeros(n, np.int64),
        features=np.zeros((n, k, dim), np.float32),
    )
    for i, frame in enumerate(frames):
        c = len(boxes[i])
        h, w = frame.shape[:2]
        out.boxes[i, :c] = np.clip(boxes[i] / np.array([w, h, w, h], np.float32), 0.0, 1.0)
        out.scores[i, :c] = scores[i]
        out.classes[i, :c] = classes[i]
        out.features[i, :c] = feats[i]
        out.counts[i] = c
    return out


def _chunks(n: int, size: int):
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


# ---------------------------------------------------------------- sources


class DetectorRegions:
    """Faster R-CNN boxes chosen bottom-up-attention style, with box-head features of the final boxes, or,
    with a featurizer (backbone: frame_encoder), RoIAlign features of those boxes from another trunk."""

    def __init__(self, cfg: RegionConfig, runtime: Runtime, allow_random: bool = False,
                 model: nn.Module | None = None, featurizer=None) -> None:
        self.cfg, self.runtime = cfg, runtime
        self.backbone = DetectorBackbone(cfg, runtime, allow_random, model)
        self.featurizer = featurizer
        self.dim = featurizer.dim if featurizer is not None else self.backbone.dim
        self.max_boxes = cfg.max_boxes

    def __call__(self, frames: list[np.ndarray], given_boxes: list[np.ndarray] | None = None) -> Regions:
        results = {"boxes": [], "scores": [], "classes": [], "feats": []}
        with self.runtime.context():
            for sl in _chunks(len(frames), self.cfg.batch_size):
                for key, values in zip(results, self._detect(frames[sl])):
                    results[key] += values
        return pad_regions(results["boxes"], results["scores"], results["classes"], results["feats"],
                           frames, self.max_boxes, self.dim)

    def propose(self, frames: list[np.ndarray], given_boxes=None) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
        """Per frame: the kept pixel boxes [n, 4], scores [n], classes [n], without features."""
        boxes, scores, classes = [], [], []
        with self.runtime.context():
            for sl in _chunks(len(frames), self.cfg.batch_size):
                _, _, scale, final = self._run(frames[sl])
                boxes += [(f[0] / scale[i].repeat(2)).cpu().numpy() for i, f in enumerate(final)]  # frame pixels
                scores += [f[1] for f in final]
                classes += [f[2] for f in final]
        return boxes, scores, classes

    def _run(self, frames: list[np.ndarray]):
        """-> image list, FPN maps, scale [B, 2], per frame (kept boxes in transformed pixels, scores, classes)."""
        m = self.backbone.model
        image_list, feats, scale = self.backbone.features(frames)
        proposals, _ = m.rpn(image_list, feats)  # B x [P, 4]
        x = self.backbone.box_features(feats, proposals, image_list.image_sizes)  # [sum P, 1024]
        logits, deltas = m.roi_heads.box_predictor(x)  # [sum P, C], [sum P, C * 4]
        boxes = m.roi_heads.box_coder.decode(deltas, proposals)  # [sum P, C, 4]
        probs = logits.float().softmax(-1)
        counts = [len(p) for p in proposals]
        final = [self._select(b.float(), p, size)
                 for b, p, size in zip(boxes.split(counts), probs.split(counts), image_list.image_sizes)]
        return image_list, feats, scale, final

    def _detect(self, frames: list[np.ndarray]):
        image_list, feats, scale, final = self._run(frames)
        kept = [f[0] for f in final]
        pixel = [(k / scale[i].repeat(2)).cpu().numpy() for i, k in enumerate(kept)]  # back to frame pixels
        if self.featurizer is not None:
            split = self.featurizer(frames, pixel)
        else:
            feats_final = self.backbone.box_features(feats, kept, image_list.image_sizes)  # [sum n, 1024]
            split = np.split(feats_final.float().cpu().numpy(), np.cumsum([len(k) for k in kept])[:-1])
        return pixel, [f[1] for f in final], [f[2] for f in final], split

    def _select(self, boxes: torch.Tensor, probs: torch.Tensor, size) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
        """Bottom-up attention's selection on one image.

        boxes [P, C, 4] class-specific regressed boxes, probs [P, C] (class 0 = background).
        Per-class NMS; a proposal's confidence is its best class score that survived NMS; then, with
        agnostic_nms_threshold < 1, NMS across classes on those boxes (a proposal whose best class differs
        from an overlapping one's is otherwise a second box on the same object); keep those >= score_threshold,
        clamped to min..max boxes (or exactly K), best first.
        """
        cfg = self.cfg
        n_prop, n_cls = probs.shape
        h, w = size
        cls_boxes = boxes[:, 1:].reshape(-1, 4).clone()  # [P * (C-1), 4]
        cls_boxes[:, 0::2] = cls_boxes[:, 0::2].clamp(0, w)
        cls_boxes[:, 1::2] = cls_boxes[:, 1::2].clamp(0, h)
        cls_scores = probs[:, 1:].reshape(-1)  # [P * (C-1)]
        labels = torch.arange(1, n_cls, device=probs.device).repeat(n_prop)
        keep = batched_nms(cls_boxes, cls_scores, labels, cfg.nms_threshold).cpu().numpy()  # sorted by score desc
        prop = keep // (n_cls - 1)
        _, first = np.unique(prop, return_index=True)  # each proposal's best surviving class (first = highest)
        best = keep[first]  # [P'] flat indices
        if cfg.agnostic_nms_threshold < 1.0:
            flat = torch.from_numpy(best).to(probs.device)
            best = best[nms(cls_boxes[flat], cls_scores[flat], cfg.agnostic_nms_threshold).cpu().numpy()]
        conf = cls_scores[torch.from_numpy(best).to(probs.device)].cpu().numpy()
        order = np.argsort(-conf, kind="stable")
        n_above = int((conf >= cfg.score_threshold).sum())
        n_keep = cfg.max_boxes if cfg.fixed_k else min(max(n_above, cfg.min_boxes), cfg.max_boxes)
        chosen = best[order[:n_keep]]
        sel = torch.from_numpy(chosen).to(probs.device)
        classes = (chosen % (n_cls - 1) + 1).astype(np.int64)
        return cls_boxes[sel], conf[order[:n_keep]].astype(np.float32), classes


class BoxRegions:
    """"given" and "grid": features for boxes that are known in advance."""

    def __init__(self, cfg: RegionConfig, runtime: Runtime, featurizer) -> None:
        self.cfg, self.runtime, self.featurizer = cfg, runtime, featurizer
        self.dim, self.max_boxes = featurizer.dim, cfg.max_boxes

    def __call__(self, frames: list[np.ndarray], given_boxes: list[np.ndarray] | None = None) -> Regions:
        boxes, scores, classes = self.propose(frames, given_boxes)
        feats: list[np.ndarray] = []
        with self.runtime.context():
            for sl in _chunks(len(frames), self.cfg.batch_size):
                feats += self.featurizer(frames[sl], boxes[sl])
        return pad_regions(boxes, scores, classes, feats, frames, self.max_boxes, self.dim)

    def propose(self, frames, given_boxes) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
        """Per frame: pixel boxes [n, 4], scores [n] (all 1), classes [n]."""
        boxes, classes = self.boxes_for(frames, given_boxes)
        return boxes, [np.ones(len(b), np.float32) for b in boxes], classes

    def boxes_for(self, frames, given_boxes) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Pixel boxes and classes per frame (at most K)."""
        if self.cfg.kind == "grid":
            boxes = [grid_boxes(f.shape[1], f.shape[0], self.cfg.grid_size) for f in frames]
            return boxes, [np.arange(len(b), dtype=np.int64) for b in boxes]
        if given_boxes is None or len(given_boxes) != len(frames):
            got = None if given_boxes is None else len(given_boxes)
            raise ValueError(f"the 'given' region source needs one box array per frame: {len(frames)} frames, got {got}")
        boxes, classes = [], []
        for frame, b in zip(frames, given_boxes):
            b, c = clean_boxes(np.asarray(b, np.float32).reshape(-1, 4), frame.shape[1], frame.shape[0])
            if len(b) > self.max_boxes:
                log.warning("%d given boxes in a frame, keeping the first max_boxes=%d", len(b), self.max_boxes)
                b, c = b[: self.max_boxes], c[: self.max_boxes]
            boxes.append(b)
            classes.append(c)
        return boxes, classes


def clean_boxes(boxes: np.ndarray, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """[n, 4] pixel boxes (NaN rows = object absent) -> boxes clipped to the frame, with their row index
    as class; rows absent or empty inside the frame are dropped."""
    rows = np.flatnonzero(np.isfinite(boxes).all(axis=1))
    b = boxes[rows].copy()
    b[:, 0::2] = b[:, 0::2].clip(0, width)
    b[:, 1::2] = b[:, 1::2].clip(0, height)
    ok = (b[:, 2] - b[:, 0] >= 1) & (b[:, 3] - b[:, 1] >= 1)
    return b[ok], rows[ok].astype(np.int64)


def grid_boxes(width: int, height: int, g: int) -> np.ndarray:
    xs, ys = np.linspace(0, width, g + 1), np.linspace(0, height, g + 1)
    return np.array([[xs[j], ys[i], xs[j + 1], ys[i + 1]] for i in range(g) for j in range(g)], np.float32)  # [g*g, 4]


def build_region_source(cfg: RegionConfig, device: str | torch.device = "cpu", trunk: tuple[nn.Module, int] | None = None,
                        allow_random: bool = False, detector: nn.Module | None = None):
    """The RegionSource for cfg.kind (or cfg.plugin). `trunk` (module, dim): a frame-encoder trunk to share (see stage.py);
    `allow_random`: a missing weight file means a seeded random init; `detector`: a built torchvision
    Faster R-CNN to use instead of loading cfg.weights."""
    if cfg.plugin:
        return load_plugin(cfg.plugin)(cfg, device, allow_random=allow_random)
    runtime = Runtime(torch.device(device), cfg.amp, cfg.channels_last)
    if cfg.backbone == "detector":
        if cfg.kind == "detector":
            return DetectorRegions(cfg, runtime, allow_random, detector)
        return BoxRegions(cfg, runtime, DetectorRoIFeatures(DetectorBackbone(cfg, runtime, allow_random, detector)))
    if trunk is None:
        net, dim = build_trunk("efficientnet_lite0", cfg.region_input_size, cfg.trunk_weights, cfg.seed, allow_random)
        trunk = (runtime.prepare(net), dim)
    featurizer = TrunkRoIFeatures(trunk[0], trunk[1], cfg, runtime)
    if cfg.kind == "detector":  # the detector's boxes, the trunk's features (a detector trained without colour)
        return DetectorRegions(cfg, runtime, allow_random, detector, featurizer)
    return BoxRegions(cfg, runtime, featurizer)


def load_plugin(spec: str):
    """The factory named by regions.plugin: 'path/to/file.py:name' (loaded by path, so it works in any
    worker process whatever its sys.path) or 'package.module:name'."""
    import importlib
    import importlib.util

    where, _, name = spec.rpartition(":")
    if where.endswith(".py"):
        module_spec = importlib.util.spec_from_file_location(f"vlpcache_plugin_{Path(where).stem}", where)
        if module_spec is None or not Path(where).is_file():
            raise ValueError(f"regions.plugin: no such file {where}")
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(where)
    factory = getattr(module, name, None)
    if factory is None:
        raise ValueError(f"regions.plugin: {where} has no {name!r}")
    return factory


# ---------------------------------------------------------------- sidecar boxes


def given_boxes_for_clip(sidecar_path: str | Path, clip: Clip) -> list[np.ndarray]:
    """T x [n_objects, 4] pixel boxes in the clip's (resized) frames, in the sidecar's object order.

    A row is NaN where the object is out of view in that frame (or the slot is padding), so the row
    index stays the object index (= the region class).
    """
    path = Path(sidecar_path)
    try:
        side = json.loads(path.read_text())
        objects = side["objects"]
        sx_src, sy_src = float(side["width"]), float(side["height"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a readable box sidecar ({type(e).__name__}: {e})") from e
    out = []
    for index, frame in zip(clip.indices, clip.frames):
        scale = np.array([frame.shape[1] / sx_src, frame.shape[0] / sy_src] * 2, np.float32)
        rows = np.full((len(objects), 4), np.nan, np.float32)
        for j, obj in enumerate(objects):
            boxes = obj["boxes"]
            if index < 0:
                continue
            if index >= len(boxes):
                raise ValueError(f"{path}: object {j} has {len(boxes)} boxes, the clip needs frame {index}")
            if boxes[index] is not None:
                rows[j] = np.asarray(boxes[index], np.float32) * scale
        out.append(rows)
    return out
