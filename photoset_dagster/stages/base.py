"""What every per-image stage shares: the outcome it reports for each image, and the shape of a
model stage (plan -> prepare -> compute -> write) that the runner drives.

An :class:`Outcome` is the one thing a stage tells the world about an image: ``done`` (computed and
written now), ``current`` (already there and valid for the recipe and inputs in force), ``failed``
(this stage could not make it: the reason says why) or ``skipped`` (an earlier stage failed for this
image, so this one was not attempted). Every consumer — the Dagster recorder, the CLI's summary, the
failure ledger — reads the same stream, so they cannot disagree.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, Literal, TypeVar

from PIL import Image

from ..core.artefacts import Recipe, text_hash
from ..core.buckets import original_size
from ..core.images import decode_image, model_input
from ..core.layout import DataLayout

Status = Literal["done", "current", "failed", "skipped"]
ModelT = TypeVar("ModelT")

# Stage names are the asset names the Dagster layer shows; pipeline order.
APPROVED_LINKS = "approved_links"
IMAGE_FACTS = "image_facts"
CAPTIONS = "captions"
DINOV3 = "dinov3_embeddings"
VAE = "vae_latents"
T5 = "t5_hidden"
STAGES: tuple[str, ...] = (APPROVED_LINKS, IMAGE_FACTS, CAPTIONS, DINOV3, VAE, T5)
MODEL_STAGES: tuple[str, ...] = (CAPTIONS, DINOV3, VAE, T5)
# The artefact kind (folder under derived/) each stage writes.
STAGE_KINDS: dict[str, str] = {
    IMAGE_FACTS: "facts",
    CAPTIONS: "captions",
    DINOV3: "dinov3",
    VAE: "vae_latents",
    T5: "t5_hidden",
}
# The stage whose result each stage consumes (besides the facts every model stage reads).
UPSTREAM: dict[str, str] = {IMAGE_FACTS: APPROVED_LINKS, CAPTIONS: IMAGE_FACTS, DINOV3: IMAGE_FACTS, VAE: IMAGE_FACTS,
                            T5: CAPTIONS}


@dataclass(frozen=True)
class Outcome:
    stage: str
    image_id: str
    status: Status
    record: Mapping[str, Any] | None = None  # the artefact's record (done, current)
    reason: str = ""  # failed, skipped

    @property
    def ok(self) -> bool:
        return self.status in ("done", "current")


@dataclass(frozen=True)
class Note:
    """A line for the log (progress, a warning) from a stage's worker."""

    message: str
    level: Literal["info", "warning"] = "info"


@dataclass
class StageDone:
    """Marks the end of one stage in a pipeline's stream, with its counts (images, not events)."""

    stage: str
    done: int = 0
    current: int = 0
    failed: dict[str, str] = field(default_factory=dict)  # failed or skipped: id -> reason
    seconds: float = 0.0
    stats: dict[str, Any] = field(default_factory=dict)  # stage-specific figures (bytes, tokens/s, ...)

    @property
    def rate(self) -> float:
        """Images computed per second of the stage (current and failed images cost time, not throughput)."""
        return self.done / self.seconds if self.seconds > 0 else 0.0


class ImageFailure(Exception):
    """One image cannot be processed by this stage; the message is the reason."""


class UpstreamFailed(ImageFailure):
    """The image is skipped: a stage it needs failed for it (in an earlier run); the message says which."""


@dataclass(frozen=True)
class Job:
    """One image whose artefact a model stage will (re)compute."""

    image_id: str
    facts: Mapping[str, Any]
    text: str = ""  # what to encode (t5)

    @property
    def raw_inputs(self) -> dict[str, str]:
        return {"raw_sha256": self.facts["inputs"]["raw_sha256"]}


class ModelStage(ABC, Generic[ModelT]):
    """How one model stage plans, prepares, computes and stores; the runner supplies the rest
    (batching by input size, decoding ahead in threads, per-image isolation, progress)."""

    name: ClassVar[str]
    kind: ClassVar[str]

    def __init__(self, layout: DataLayout, recipe: Recipe, batch_size: int) -> None:
        self.layout = layout
        self.recipe = recipe
        self.batch_size = batch_size

    @abstractmethod
    def plan(self, image_id: str, facts: Mapping[str, Any]) -> tuple[Job, Mapping[str, Any] | None]:
        """The image's job, and its record when the artefact is already valid and current (None:
        it needs computing). Raises ImageFailure when the image cannot be done (e.g. no caption yet)."""

    def group(self, job: Job) -> Hashable:
        """Images of one group stack into one model input tensor."""
        return job.facts["aspect_bucket"]

    @abstractmethod
    def prepare(self, job: Job) -> Any:
        """CPU work in a decoding thread (decode, crop, resize)."""

    @abstractmethod
    def compute(self, model: ModelT, jobs: Sequence[Job], prepared: Sequence[Any]) -> Sequence[Any]:
        """One output per job, in order; an Exception instance marks that image failed."""

    @abstractmethod
    def write(self, job: Job, output: Any) -> Mapping[str, Any]:
        """Commit the artefact atomically (file, then its provable sidecar); returns the record."""

    def bytes_per_image(self) -> int:
        """About how much one image's artefact takes on disk (for the disk preflight)."""
        return 64 * 1024

    def streams(self, model: ModelT) -> bool:
        """Whether ``model`` takes a continuous stream (see :meth:`stream`) rather than batches."""
        return False

    def stream(self, model: ModelT, items: Iterator[tuple[Job, Any]]) -> Iterator[tuple[Job, Any]]:
        """(job, output or Exception) in completion order, for a model that :meth:`streams`."""
        raise NotImplementedError


def input_group(facts: Mapping[str, Any], mode: str, max_pixels: int) -> str:
    """The model input size an image will have: its bucket, or its own rounded size in "original" mode."""
    if mode == "bucket":
        return facts["aspect_bucket"]
    width, height = original_size(facts["width"], facts["height"], 16, max_pixels)
    return f"{width}x{height}"


def model_image(layout: DataLayout, job: Job, mode: str, max_pixels: int) -> Image.Image:
    image = decode_image(layout.raw_path(job.image_id))
    return model_input(image, job.facts["aspect_bucket"], mode=mode, max_pixels=max_pixels)


def data_version(stage: str, record: Mapping[str, Any]) -> str | None:
    """What identifies an artefact's content (Dagster's data version): the array's sha256, the
    caption's hash, the raw file's hash (facts) or stat fingerprint (the link)."""
    if "npy_sha256" in record:
        return record["npy_sha256"]
    if stage == CAPTIONS:
        caption = record.get("caption")
        return text_hash(caption) if isinstance(caption, str) else None
    if stage == IMAGE_FACTS:
        return (record.get("inputs") or {}).get("raw_sha256")
    if stage == APPROVED_LINKS and "raw_size" in record:
        return f"{record['ext']}:{record['raw_size']}:{record['raw_mtime_ns']}"
    return None
