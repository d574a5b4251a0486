"""
Choosing the demonstrations of each evaluated sample: at random from a seeded query set, or by RICES (retrieval of
the training examples whose images are most similar to the query's, by CLIP image embeddings cached on disk).

Both return a *plan*: for every evaluated sample, the indices of its demonstrations in the pool, computed before any
inference, so that a resumed run gives every sample the demonstrations it would have had.
"""

import hashlib
import json
import logging
import random
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from otter.processing_otter import load_image

from .fingerprint import json_default, weights_fingerprint

logger = logging.getLogger(__name__)


def random_demos(pool_size: int, num_samples: int, shots: int, seed: int, query_set_size: int) -> list[list[int]]:
    """
    OpenFlamingo's random protocol: a query set of `query_set_size` pool indices, then `shots` distinct demos per
    sample drawn from it, all from one `random.Random(seed)`. Returns `num_samples` lists of `shots` pool indices.
    """
    rng = random.Random(seed)
    query_set = rng.sample(range(pool_size), min(query_set_size, pool_size))
    if shots > len(query_set):
        raise ValueError(f"{shots} demonstrations per sample asked for, but the query set holds only {len(query_set)} "
                         f"examples (pool of {pool_size}, query_set_size={query_set_size})")
    return [rng.sample(query_set, shots) for _ in range(num_samples)]


def rices_demos(query_embeddings: torch.Tensor, pool_embeddings: torch.Tensor, shots: int, device="cpu",
                chunk_size: int = 1024) -> list[list[int]]:
    """
    RICES: for each query (rows of `query_embeddings` `(N, D)`, L2-normalised) the `shots` pool examples
    (`pool_embeddings` `(P, D)`) of highest cosine similarity, ordered least similar first, most similar last (next
    to the query), as OpenFlamingo orders them. The last k of a row are the query's k most similar examples.
    Similarities are computed on `device`, `chunk_size` queries at a time.
    """
    if shots > pool_embeddings.shape[0]:
        raise ValueError(f"{shots} demonstrations per sample asked for, but the pool holds {pool_embeddings.shape[0]}")
    pool_embeddings = pool_embeddings.to(device)
    plans = []
    for start in range(0, query_embeddings.shape[0], chunk_size):
        similarity = query_embeddings[start:start + chunk_size].to(device) @ pool_embeddings.T  # (chunk, P)
        top = similarity.topk(shots, dim=-1).indices  # most similar first
        plans.extend(row[::-1] for row in top.tolist())
    return plans


class ImageEmbedder:
    """
    L2-normalised CLIP image embeddings `(N, D)` of image files, cached on disk.

    `vision_model` is a transformers `CLIPVisionModelWithProjection` (its `image_embeds`, CLIP's joint space, as
    OpenFlamingo's RICES uses) or a `CLIPVisionModel` (its `pooler_output`, the post-LayerNorm CLS token: what an Otter
    model's own vision tower offers offline). The cache file is named by a hash of the encoder (class, config, a
    fingerprint of all its weights, the image processor's settings) and of the image paths, so it is reused exactly
    when both match.
    """

    def __init__(self, vision_model, image_processor, cache_dir: str | Path, batch_size: int = 64):
        self.vision_model = vision_model
        self.image_processor = image_processor
        self.cache_dir = Path(cache_dir)
        self.batch_size = batch_size
        digest = hashlib.sha256(type(vision_model).__name__.encode())
        digest.update(vision_model.config.to_json_string().encode())
        digest.update(weights_fingerprint(vision_model).encode())
        digest.update(json.dumps(image_processor.to_dict(), sort_keys=True, default=json_default).encode())
        self.fingerprint = digest.hexdigest()

    @torch.no_grad()
    def _embed(self, paths: list[Path]) -> torch.Tensor:
        self.vision_model.eval()
        chunks = []
        for start in tqdm(range(0, len(paths), self.batch_size), desc="RICES embeddings", unit="batch"):
            images = [load_image(path) for path in paths[start:start + self.batch_size]]
            pixel_values = self.image_processor(images, return_tensors="pt")["pixel_values"]
            pixel_values = pixel_values.to(self.vision_model.device, self.vision_model.dtype)
            outputs = self.vision_model(pixel_values=pixel_values)
            embeddings = outputs.image_embeds if hasattr(outputs, "image_embeds") else outputs.pooler_output
            chunks.append(torch.nn.functional.normalize(embeddings.float(), dim=-1).cpu())
        return torch.cat(chunks)

    def __call__(self, paths: list[Path]) -> torch.Tensor:
        """`paths` (duplicates allowed) -> `(len(paths), D)` embeddings; each distinct image is embedded once."""
        unique = list(dict.fromkeys(str(path) for path in paths))
        key = hashlib.sha256((self.fingerprint + "\n" + "\n".join(unique)).encode()).hexdigest()[:24]
        cache_file = self.cache_dir / f"rices-{key}.safetensors"
        if cache_file.exists():
            embeddings = load_file(cache_file)["embeddings"]
            logger.info("RICES: %d cached image embeddings from %s", len(unique), cache_file)
        else:
            embeddings = self._embed([Path(path) for path in unique])
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            save_file({"embeddings": embeddings.contiguous()}, cache_file, metadata={"images": str(len(unique))})
            logger.info("RICES: %d image embeddings cached in %s", len(unique), cache_file)
        row = {path: index for index, path in enumerate(unique)}
        return embeddings[[row[str(path)] for path in paths]]
