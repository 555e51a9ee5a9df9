"""A reidzoo model as the appearance model of a multi-object tracker.

BoxMOT's appearance trackers (BotSort, StrongSort, DeepOcSort, BoostTrack, HybridSort, ...)
take a ready-made re-ID model as ``reid_model=``: any object with
``get_features(boxes, image)``, called once per frame with that frame's detection boxes and
the frame as an OpenCV BGR array, returning one feature row per box. :class:`BoxMOTReID` is
that object for any reidzoo config and checkpoint, computing each detection's feature exactly
as :class:`reidzoo.inference.FeatureExtractor` computes the feature of the cropped image, so a
tracker sees the features the model was evaluated with. BoxMOT itself is not needed to use it.
"""

import numpy as np
import torch
import torch.nn.functional as F

from reidzoo.inference import FeatureExtractor

#: Column counts of axis-aligned detection rows: x1 y1 x2 y2 [conf cls [det_index ...]].
AABB_COLUMNS = (4, 6, 8)


def _as_boxes(boxes):
    """``[N, 4]`` float64 x1 y1 x2 y2 from detection rows (the first four columns)."""
    array = np.asarray(boxes, dtype=np.float64)
    if array.size == 0:
        return np.zeros((0, 4))
    if array.ndim == 1:
        array = array[None]
    if array.ndim != 2 or array.shape[1] not in AABB_COLUMNS:
        raise ValueError(
            f"boxes: expected [N, 4|6|8] axis-aligned rows (x1, y1, x2, y2[, conf, cls, ...]), "
            f"got shape {array.shape}; oriented boxes (5, 7 or 9 columns) are not supported"
        )
    if not np.isfinite(array[:, :4]).all():
        raise ValueError("boxes: coordinates must be finite")
    return array[:, :4]


def _as_frame(image):
    """The frame as an ``[H, W, 3]`` array, checked."""
    frame = np.asarray(image)
    if frame.ndim != 3 or frame.shape[2] != 3:
        raise ValueError(
            f"image: expected an [H, W, 3] BGR frame (OpenCV order), got shape {frame.shape}"
        )
    return frame


def crop_boxes(boxes, image, empty_size):
    """RGB crops of a BGR frame at detection boxes, as a tracker's detections cut them.

    Coordinates are rounded to whole pixels (x2, y2 exclusive) and clipped to the frame; a
    box with nothing left inside the frame gives a black ``empty_size`` image, so every box
    still has a feature.

    Args:
        boxes (array-like): ``[N, 4|6|8]`` rows, x1 y1 x2 y2 in pixels first.
        image (np.ndarray): ``[H, W, 3]`` frame in BGR order (OpenCV, BoxMOT), 0-255.
        empty_size (tuple[int, int]): (H, W) of the black image given for an empty crop.
    Returns:
        list[np.ndarray]: N ``[h, w, 3]`` RGB crops (views of ``image`` where possible).
    Raises:
        ValueError: ``boxes`` are not axis-aligned rows, or ``image`` is not ``[H, W, 3]``.
    """
    frame = _as_frame(image)
    height, width = frame.shape[:2]
    crops = []
    for x1, y1, x2, y2 in np.rint(_as_boxes(boxes)).astype(np.int64):
        x1, x2 = max(int(x1), 0), min(int(x2), width)
        y1, y2 = max(int(y1), 0), min(int(y2), height)
        if x2 > x1 and y2 > y1:
            crops.append(frame[y1:y2, x1:x2, ::-1])
        else:
            crops.append(np.zeros((*empty_size, 3), dtype=frame.dtype))
    return crops


class BoxMOTReID:
    """A reidzoo model with the interface BoxMOT's trackers take as ``reid_model``.

    ``get_features(boxes, image)`` crops each box out of the BGR frame (:func:`crop_boxes`),
    converts it to RGB and sends it through the extractor's own path: the config's test
    transforms (resize to ``INPUT.SIZE_TEST`` with its interpolation, registered
    ``INPUT.TRANSFORMS``), batches of ``batch_size``, flip averaging when enabled and L2
    normalisation, all in PyTorch on the extractor's device. A detection's feature therefore
    equals ``FeatureExtractor.extract`` of the RGB crop.

    Args:
        model (FeatureExtractor | str | CfgNode): an extractor, or what
            :class:`~reidzoo.inference.FeatureExtractor` takes as its config (a YAML file, a
            registered model name such as ``ianet-market1501``, a config).
        **kwargs: :class:`~reidzoo.inference.FeatureExtractor` arguments (``checkpoint``,
            ``opts``, ``device``, ``batch_size``, ``flip``, ``allow_random_weights``, ...) when
            ``model`` is not an extractor.

    Attributes:
        extractor (FeatureExtractor): the model and its transforms.
        device (torch.device): where the model runs (BoxMOT's encoders read it).
        input_shape (tuple[int, int]): (H, W) crops are resized to (``INPUT.SIZE_TEST``).
        embedding_dim (int): feature width, found by one forward pass on first use.

    Raises:
        TypeError: ``model`` is an extractor and extractor arguments are given too.

    Example::

        from boxmot import BotSort
        reid = BoxMOTReID("ianet-market1501", checkpoint="model_final.pth", device="cuda:0")
        tracker = BotSort(reid_model=reid)
        tracks = tracker.update(dets, frame_bgr)  # dets [N, 6]: x1 y1 x2 y2 conf cls
    """

    def __init__(self, model, **kwargs):
        if isinstance(model, FeatureExtractor):
            if kwargs:
                raise TypeError(
                    f"BoxMOTReID got a FeatureExtractor and extractor arguments "
                    f"{sorted(kwargs)}; give one or the other"
                )
            self.extractor = model
        else:
            self.extractor = FeatureExtractor(model, **kwargs)
        self._dim = None

    @property
    def device(self):
        """torch.device: the extractor's device."""
        return self.extractor.device

    @property
    def input_shape(self):
        """tuple[int, int]: (H, W) of the model input."""
        return self.extractor.input_size

    @property
    def embedding_dim(self):
        """int: width D of a feature row."""
        if self._dim is None:
            self.warmup()
        return self._dim

    def warmup(self, imgsz=None):
        """Run the model once on a black crop (first-call allocations; sets the feature width).

        Args:
            imgsz: ignored; accepted for the signature of BoxMOT's own backends.
        """
        black = np.zeros((*self.input_shape, 3), dtype=np.uint8)
        self._dim = int(self._features([black]).shape[1])

    def _features(self, crops):
        ex = self.extractor
        chunks = []
        for start in range(0, len(crops), ex.batch_size):
            batch = torch.stack([ex.preprocess(c) for c in crops[start : start + ex.batch_size]])
            chunks.append(ex.forward(batch))
        feats = torch.cat(chunks, dim=0)
        return F.normalize(feats, p=2, dim=1) if ex.normalize else feats

    def get_features(self, boxes, image):
        """Features of the detections of one frame.

        Args:
            boxes (array-like): ``[N, 4|6|8]`` detection rows, x1 y1 x2 y2 in pixels first
                (as BoxMOT passes them); other columns are ignored.
            image (np.ndarray): the frame, ``[H, W, 3]`` uint8 in BGR order.
        Returns:
            np.ndarray: ``[N, D]`` float32, one row per box in order (L2-normalised unless
            the extractor's ``normalize`` is off); ``[0, D]`` for no boxes.
        Raises:
            ValueError: oriented or malformed boxes, or a frame that is not ``[H, W, 3]``.
        """
        crops = crop_boxes(boxes, image, self.input_shape)
        if not crops:
            return np.zeros((0, self.embedding_dim), dtype=np.float32)
        feats = self._features(crops).numpy().astype(np.float32, copy=False)
        self._dim = int(feats.shape[1])
        return feats
