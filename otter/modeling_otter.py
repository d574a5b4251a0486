"""Otter / OpenFlamingo as native transformers models: CLIP vision tower + Perceiver + a causal LM with gated
cross-attention before its decoder layers."""

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn
from transformers import CLIPVisionModel, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache
from transformers.utils import ModelOutput
from transformers.utils.deprecation import deprecate_kwarg

from .configuration_otter import OtterConfig
from .cross_attention import CrossAttentionMedia, GatedCrossAttentionBlock, OtterDecoderLayer, media_attention_mask
from .language_models import (
    adopt_language_model,
    build_language_model,
    decoder_layers_path,
    get_decoder_layers,
    max_positions,
    set_decoder_layers,
)
from .perceiver import PerceiverResampler


@dataclass
class OtterModelOutputWithPast(ModelOutput):
    """
    last_hidden_state: `(batch, text_len, hidden)`, the language model's final hidden states.
    image_hidden_states: `(batch, media, num_latents, dim_visual)`, the perceiver's output, when images were given.
    """

    last_hidden_state: torch.FloatTensor | None = None
    cache: Cache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    image_hidden_states: torch.FloatTensor | None = None


@dataclass
class OtterCausalLMOutputWithPast(ModelOutput):
    """
    loss: next-token cross-entropy over `labels` (positions labelled -100 are ignored), when labels were given.
    logits: `(batch, text_len, vocab)`.
    image_hidden_states: `(batch, media, num_latents, dim_visual)`, the perceiver's output, when images were given.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    cache: Cache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    image_hidden_states: torch.FloatTensor | None = None


class DamagedModelError(ValueError):
    """A model folder that does not hold the model its config describes: tensors missing, unexpected or mis-shaped,
    an unreadable weights file or config."""


def _listed(names, limit: int = 8) -> str:
    names = sorted(map(str, names))
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _check_model_folder(name, config_given: bool) -> None:
    """A clear error, before transformers looks, for a local path that is not an Otter folder."""
    if name is None:
        return
    path = Path(name)
    if path.is_dir():
        config_file = path / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"{path} is not a model folder: it has no config.json")
        try:
            model_type = json.loads(config_file.read_text(encoding="utf-8")).get("model_type")
        except (ValueError, AttributeError) as error:
            raise DamagedModelError(f"{config_file} is not a model config (not a JSON object: {error})") from None
        if not config_given and (model_type == "flamingo" or model_type == "otter" and "perceiver_num_latents" not in
                                 json.loads(config_file.read_text(encoding="utf-8"))):
            raise ValueError(f"{path} is a checkpoint of the Otter project's own code (model_type {model_type!r}), "
                             f"whose layout this library does not load as it is: convert it with `otter convert otter "
                             f"--model {path} --out NEW_FOLDER`")
        if model_type != "otter" and not config_given:
            raise ValueError(f"{path} is not an Otter model folder: {config_file} has model_type {model_type!r}, "
                             "expected 'otter' (convert a checkpoint with `otter convert`)")
    elif path.exists():
        raise NotADirectoryError(f"{path} is a file; expected a model folder")
    elif str(name).startswith((".", "/", "~")) or str(name).count("/") > 1 or os.sep != "/" and os.sep in str(name):
        raise FileNotFoundError(f"model folder {name} does not exist")  # a path, not a hub id (owner/name)


def _unreadable_weights(folder: Path) -> str:
    """Which safetensors file of `folder` cannot be opened, and why ('' when each opens)."""
    for file in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(file, framework="pt") as handle:
                for key in handle.keys():
                    handle.get_slice(key)
        except (SafetensorError, OSError) as error:
            return f"{file} is damaged or truncated ({error})"
    return ""


class OtterPreTrainedModel(PreTrainedModel):
    config: OtterConfig
    base_model_prefix = ""
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = ["OtterDecoderLayer", "PerceiverResampler", "CLIPEncoderLayer"]
    _supports_sdpa = True

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """
        transformers' `from_pretrained`, strict: a tensor the model needs that the weights lack, a tensor the weights
        hold that the model has no place for, or one of the wrong shape raises `DamagedModelError` naming them (tied
        output embeddings, which are not stored, excepted); so does an unreadable weights file. Nothing is left with
        random values. `ignore_mismatched_sizes=True` explicitly re-initialises mis-shaped tensors, as in transformers.
        A local path that is not an Otter folder is refused before anything is read.
        """
        _check_model_folder(pretrained_model_name_or_path, kwargs.get("config") is not None)
        output_loading_info = kwargs.pop("output_loading_info", False)
        allow_mismatched = kwargs.pop("ignore_mismatched_sizes", False)
        try:  # mismatched sizes are reported below, by name, rather than by transformers' RuntimeError
            model, info = super().from_pretrained(pretrained_model_name_or_path, *model_args, output_loading_info=True,
                                                  ignore_mismatched_sizes=True, **kwargs)
        except SafetensorError as error:
            folder = Path(pretrained_model_name_or_path or "")
            where = _unreadable_weights(folder) if folder.is_dir() else ""
            raise DamagedModelError(where or f"{pretrained_model_name_or_path}: cannot read the weights ({error})") \
                from error
        problems = []
        if info["missing_keys"]:
            problems.append(f"missing from the weights ({len(info['missing_keys'])}): {_listed(info['missing_keys'])}")
        if info["unexpected_keys"]:
            problems.append(f"in the weights but not in the model ({len(info['unexpected_keys'])}): "
                            f"{_listed(info['unexpected_keys'])}")
        if info["mismatched_keys"] and not allow_mismatched:
            shapes = [f"{key} {tuple(saved)} where the model has {tuple(expected)}"
                      for key, saved, expected in info["mismatched_keys"]]
            problems.append(f"of another shape ({len(shapes)}): {_listed(shapes, 4)}")
        if problems:
            raise DamagedModelError(
                f"{pretrained_model_name_or_path} does not hold the model its config describes (a damaged or edited "
                "folder?); tensors " + "; tensors ".join(problems))
        return (model, info) if output_loading_info else model

    def save_pretrained(self, save_directory, *args, **kwargs):
        """
        transformers' `save_pretrained`, which also writes a model card when the folder has none: README.md with the
        Hub's metadata, what the model is and a snippet that loads it (`otter.model_card`; the license and base model
        of the folder it was loaded from carry over). An existing README.md is never overwritten.
        """
        card = Path(save_directory) / "README.md"
        had_card = card.exists()
        result = super().save_pretrained(save_directory, *args, **kwargs)
        if not had_card and kwargs.get("is_main_process", True):
            from .model_card import saved_model_card

            saved_model_card(self, save_directory).save(card)
        return result

    @classmethod
    def register_for_auto_class(cls, auto_class="AutoModel"):
        """Nothing to register: the class lives in the installed package, and `auto_map` points there (see
        `otter.auto_module`); registering would copy Otter's source files into every folder saved afterwards."""

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, PerceiverResampler):
            init.normal_(module.latents, mean=0.0, std=1.0)
            if module.frame_embs is not None:
                init.normal_(module.frame_embs, mean=0.0, std=1.0)
        elif isinstance(module, GatedCrossAttentionBlock):
            init.zeros_(module.attn_gate)
            init.zeros_(module.ff_gate)


class OtterModel(OtterPreTrainedModel):
    """
    The Otter model without a language-modelling loss or generation: returns the language model's last hidden states.

    Built from `config`, or around an existing `vision_model` (`CLIPVisionModel`) and `language_model` (a causal LM,
    whose decoder layers get wrapped in place) as `otter.from_parts` does.
    """

    def __init__(self, config: OtterConfig, vision_model: CLIPVisionModel | None = None,
                 language_model: PreTrainedModel | None = None):
        super().__init__(config)
        self.vision_model = vision_model if vision_model is not None else CLIPVisionModel._from_config(config.vision_config)
        dim_visual = config.vision_config.hidden_size
        self.perceiver = PerceiverResampler(
            dim=dim_visual,
            depth=config.perceiver_depth,
            heads=config.perceiver_heads,
            dim_head=config.perceiver_dim_head,
            num_latents=config.perceiver_num_latents,
            ff_mult=config.perceiver_ff_mult,
            max_num_frames=config.max_num_frames,
        )
        if language_model is None:
            language_model = build_language_model(config.text_config)
        else:
            adopt_language_model(language_model, config.text_config._attn_implementation)
        self._decoder_layers_path = decoder_layers_path(config.text_config.model_type, config.decoder_layers_attr)
        layers = get_decoder_layers(language_model, self._decoder_layers_path)
        every_n = config.cross_attn_every_n_layers
        if every_n > len(layers):
            raise ValueError(
                f"cross_attn_every_n_layers={every_n} exceeds the language model's {len(layers)} decoder layers"
            )
        dim = config.text_config.hidden_size
        wrapped = nn.ModuleList(
            OtterDecoderLayer(
                layer,
                GatedCrossAttentionBlock(dim, dim_visual, config.cross_attn_heads, config.cross_attn_dim_head,
                                         config.cross_attn_ff_mult)
                if (index + 1) % every_n == 0 else None,
                (index + 1) // every_n - 1 if (index + 1) % every_n == 0 else None,
            )
            for index, layer in enumerate(layers)
        )
        set_decoder_layers(language_model, self._decoder_layers_path, wrapped)
        self.language_model = language_model
        # one source of truth: the sub-configs are the parts' own (attention implementation, resized vocab, ...)
        config.vision_config = self.vision_model.config
        config.text_config = language_model.config
        self.post_init()

    # -- embeddings are the language model's ------------------------------------------------------------------
    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.language_model.get_output_embeddings()

    def set_output_embeddings(self, value):
        self.language_model.set_output_embeddings(value)

    # -- training decisions -----------------------------------------------------------------------------------
    def freeze_backbones(self, train_embeddings: bool = False) -> None:
        """
        Freeze everything but the perceiver and the gated cross-attention blocks (OpenFlamingo's recipe).
        `train_embeddings=True` also trains the language model's input embeddings (and its output embeddings when
        they are not tied to them). Nothing else in this library changes `requires_grad`.
        """
        self.requires_grad_(False)
        self.perceiver.requires_grad_(True)
        for block in self.cross_attention_blocks():
            block.requires_grad_(True)
        if train_embeddings:
            self.get_input_embeddings().requires_grad_(True)
            output = self.get_output_embeddings()
            if output is not None:
                output.requires_grad_(True)

    def decoder_layers(self) -> nn.ModuleList:
        """The language model's decoder layers, each an `OtterDecoderLayer`."""
        return get_decoder_layers(self.language_model, self._decoder_layers_path)

    def cross_attention_blocks(self) -> list[GatedCrossAttentionBlock]:
        return [layer.gated_cross_attn_layer for layer in self.decoder_layers() if layer.gated_cross_attn_layer is not None]

    # -- media ------------------------------------------------------------------------------------------------
    def get_image_features(self, pixel_values: torch.Tensor, frame_mask: torch.Tensor | None = None) -> torch.Tensor:
        """
        `pixel_values` `(batch, media, frames, C, H, W)`, or `(batch, media, C, H, W)` for single frames ->
        perceiver latents `(batch, media, num_latents, dim_visual)`. `frame_mask` `(batch, media, frames)` marks the
        real frames when media hold different numbers: the others are neither encoded nor read. The vision tower
        encodes `config.vision_chunk_size` frames at a time when set.
        """
        if pixel_values.ndim == 5:
            pixel_values = pixel_values.unsqueeze(2)
        if pixel_values.ndim != 6:
            raise ValueError(
                "pixel_values must be (batch, media, frames, channels, height, width) or (batch, media, channels, "
                "height, width) here (forward and generate also take the processor's (images, channels, height, "
                f"width)); got a tensor of shape {tuple(pixel_values.shape)}"
            )
        batch, media, frames = pixel_values.shape[:3]
        max_frames = self.config.max_num_frames
        if max_frames is not None and frames > max_frames:
            raise ValueError(f"pixel_values holds {frames} frames per media item; this model takes at most {max_frames}")
        if frame_mask is not None and tuple(frame_mask.shape) != (batch, media, frames):
            raise ValueError(f"frame_mask has shape {tuple(frame_mask.shape)}; pixel_values needs "
                             f"{(batch, media, frames)}")
        images = pixel_values.flatten(0, 2).to(self.vision_model.dtype)
        real = frame_mask.flatten().bool().to(images.device) if frame_mask is not None else None
        encoded = self._vision_tokens(images if real is None else images[real])
        if real is None:
            tokens = encoded
        else:
            tokens = encoded.new_zeros(images.shape[0], *encoded.shape[1:])
            tokens[real] = encoded
        tokens = tokens.reshape(batch, media, frames, *tokens.shape[1:])
        return self.perceiver(tokens, frame_mask)

    def _vision_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """CLIP's patch tokens `(images, patches, dim)` (CLS dropped), `config.vision_chunk_size` images at a time."""
        chunk = self.config.vision_chunk_size or max(images.shape[0], 1)
        tokens = torch.cat([self.vision_model(pixel_values=part).last_hidden_state[:, 1:]
                            for part in (images.split(chunk) if images.shape[0] else [images])])
        if self.config.vision_feature_post_layernorm:
            tokens = self.vision_model.post_layernorm(tokens)
        return tokens

    def batched_pixel_values(self, pixel_values: torch.Tensor | None,
                             input_ids: torch.LongTensor | None) -> torch.Tensor | None:
        """
        The processor's `pixel_values` `(images, C, H, W)`, every image of the batch in `<image>` order (LLaVA's
        layout, which pipelines can batch), -> `(batch, media, 1, C, H, W)`: each sample's images in its first slots,
        zeros after them (never attended); None when there are no images. Other layouts are returned as they are.
        """
        if pixel_values is None or pixel_values.ndim != 4:
            return pixel_values
        if input_ids is None:
            raise ValueError("pixel_values of shape (images, C, H, W) are sorted into samples by their <image> tokens: "
                             "pass the whole input_ids (or pixel_values of shape (batch, media, frames, C, H, W))")
        counts = (input_ids == self.config.media_token_id).sum(-1).to(pixel_values.device)
        if pixel_values.shape[0] != int(counts.sum()):
            raise ValueError(f"pixel_values holds {pixel_values.shape[0]} images but input_ids hold {int(counts.sum())} "
                             f"<image> tokens ({counts.tolist()} per sample)")
        if pixel_values.shape[0] == 0:
            return None
        batched = pixel_values.new_zeros(len(counts), int(counts.max()), 1, *pixel_values.shape[1:])
        batched[torch.arange(batched.shape[1], device=counts.device) < counts[:, None]] = pixel_values[:, None]
        return batched

    def get_media_key_values(self, image_features: torch.Tensor) -> torch.Tensor:
        """
        The keys and values every cross-attention block computes from the image latents, stacked:
        `(batch, num_cross_attention_blocks, media * num_latents, 2 * heads * dim_head)`. `generate()` computes them
        once per call.
        """
        return torch.stack(self._media_key_values_per_block(image_features), 1)

    def _media_key_values_per_block(self, image_features: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """
        As `get_media_key_values`, one `(batch, media * num_latents, 2 * heads * dim_head)` tensor per block, each on
        the device of `image_features` (a model spread over devices by a device map computes each on its block's
        device; each decoder layer takes its own to its device when it runs).
        """
        return tuple(block.attn.media_key_values(image_features).to(image_features.device)
                     for block in self.cross_attention_blocks())

    def media_index(self, input_ids: torch.LongTensor) -> torch.LongTensor:
        """1-based index of the latest `<image>` at or before each token, 0 before the first: `(batch, text_len)`."""
        return (input_ids == self.config.media_token_id).cumsum(dim=-1)

    def _num_media(self, media_key_values: torch.Tensor | tuple[torch.Tensor, ...]) -> int:
        per_block = media_key_values[0] if isinstance(media_key_values, tuple) else media_key_values[:, 0]
        return per_block.shape[1] // self.config.perceiver_num_latents

    def _check_prompt(self, input_ids: torch.LongTensor, images_given: bool, new_tokens: int = 0) -> None:
        """
        Refuses what the model cannot answer faithfully: an empty prompt, `<image>` tokens without images (the model
        would answer as if none were shown), more tokens than the language model's positions (`new_tokens`: how
        many `generate()` may add).
        """
        if input_ids.shape[-1] == 0:
            raise ValueError("input_ids holds no tokens (an empty prompt): give the model some text")
        if not images_given:
            with_markers = (input_ids == self.config.media_token_id).any(-1).nonzero().flatten().tolist()
            if with_markers:
                raise ValueError(
                    f"sample(s) {with_markers} hold <image> tokens but no pixel_values were given: the model would "
                    "answer as if no image was shown; pass the images (processor(text=..., images=...))"
                )
        limit = max_positions(self.config.text_config)
        if limit is not None and input_ids.shape[-1] + new_tokens > limit:
            asked = (f"{input_ids.shape[-1]} prompt tokens + max_new_tokens {new_tokens} = "
                     f"{input_ids.shape[-1] + new_tokens}" if new_tokens else f"{input_ids.shape[-1]} tokens")
            raise ValueError(f"the input is too long: {asked}, but the language model takes at most {limit} "
                             "positions; shorten the prompt (fewer demonstrations) or ask for fewer new tokens")

    @staticmethod
    def _check_media_count(markers_per_sample: torch.Tensor, num_media: int) -> None:
        too_many = (markers_per_sample > num_media).nonzero().flatten().tolist()
        if too_many:
            raise ValueError(
                f"sample(s) {too_many} hold more <image> tokens than the {num_media} media items given per sample"
            )

    def _media_for_layers(self, input_ids, media_key_values, media_index, cache) -> CrossAttentionMedia | None:
        """
        What every cross-attention layer reads in one forward call: its media keys/values, the mask, has_media
        (`CrossAttentionMedia`, passed down the language model's forward). `media_key_values` is stacked
        (`get_media_key_values`) or one tensor per block (`_media_key_values_per_block`, what a forward from
        pixel_values uses: a stacked tensor would cost a copy, and in training, one zero-filled gradient of its full
        size per block).
        """
        if media_key_values is None:
            return None
        if input_ids is None:
            raise ValueError("Otter needs input_ids to locate <image> tokens; inputs_embeds alone is not enough")
        per_block = media_key_values if isinstance(media_key_values, tuple) else media_key_values.unbind(1)
        if per_block[0].shape[0] != input_ids.shape[0]:
            raise ValueError(
                f"the images are for a batch of {per_block[0].shape[0]} but input_ids has {input_ids.shape[0]} rows"
            )
        num_media = self._num_media(media_key_values)
        if media_index is None:
            if cache is not None and cache.get_seq_length() > 0:
                raise ValueError(
                    "with a filled cache, pass media_index for the new tokens: model.media_index(full_input_ids)"
                    "[:, -new_tokens:] (generate() does this for you)"
                )
            media_index = self.media_index(input_ids)
            self._check_media_count(media_index[:, -1], num_media)
        attn_mask, has_media = media_attention_mask(
            media_index, num_media, self.config.perceiver_num_latents, self.config.only_attend_immediate_media
        )
        return CrossAttentionMedia(per_block, attn_mask, has_media.to(per_block[0].dtype))

    def _media_key_values_for(self, pixel_values, media_key_values, input_ids=None, frame_mask=None):
        """
        Image features and per-block media keys/values for `pixel_values`. With `input_ids` (the full sequences), the
        media items after a sample's last `<image>` (batch padding) are not encoded: their features stay zero, and no
        token attends to them.
        """
        if pixel_values is None:
            return None, media_key_values
        if media_key_values is not None:
            raise ValueError("pass either pixel_values or media_key_values, not both")
        used = None
        if input_ids is not None and pixel_values.ndim >= 5 and pixel_values.shape[0] == input_ids.shape[0]:
            media = pixel_values.shape[1]
            used = torch.arange(media, device=input_ids.device) < self.media_index(input_ids)[:, -1:]
            used = None if used.all() or not used.any() else used.to(pixel_values.device)
        if used is None:
            image_features = self.get_image_features(pixel_values, frame_mask)
        else:
            used_frames = frame_mask[used].unsqueeze(0) if frame_mask is not None else None
            encoded = self.get_image_features(pixel_values[used].unsqueeze(0), used_frames)[0]  # (used media, ...)
            image_features = encoded.new_zeros(*used.shape, *encoded.shape[1:])
            image_features[used] = encoded
        return image_features, self._media_key_values_per_block(image_features)

    def _run(self, language_model, input_ids, pixel_values, media_key_values, media_index, cache, frame_mask=None,
             **kwargs):
        """Run `language_model` (the causal LM, or its base model) conditioned on the media."""
        full_sequences = media_index is None and (cache is None or cache.get_seq_length() == 0)
        pixel_values = self.batched_pixel_values(pixel_values, input_ids if full_sequences else None)
        if full_sequences and input_ids is not None:
            self._check_prompt(input_ids, images_given=pixel_values is not None or media_key_values is not None)
        image_features, media_key_values = self._media_key_values_for(
            pixel_values, media_key_values, input_ids if full_sequences else None, frame_mask)
        media = self._media_for_layers(input_ids, media_key_values, media_index, cache)
        if media is None:
            outputs = language_model(input_ids=input_ids, cache=cache, **kwargs)
        else:
            outputs = language_model(input_ids=input_ids, cache=cache, otter_media=media, **kwargs)
            if media.reads < len(media.per_block):
                raise RuntimeError(
                    f"{type(language_model).__name__} did not pass the keyword argument otter_media on to its decoder "
                    f"layers ({media.reads} of {len(media.per_block)} cross-attention blocks got the images): its "
                    "answers would ignore them. Its forward must pass **kwargs down to the layers, as transformers' "
                    "models do."
                )
        return image_features, outputs

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = None,
        media_key_values: torch.Tensor | None = None,
        media_index: torch.LongTensor | None = None,
        frame_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> OtterModelOutputWithPast:
        r"""
        input_ids `(batch, text_len)` with `<image>` tokens where images go; pixel_values `(images, C, H, W)` as the
        processor returns them (every image of the batch in `<image>` order), or `(batch, media, frames, C, H, W)`
        (or 5-D for single frames), media padded with anything for samples with fewer images (padded media are never
        attended, nor encoded: their `image_hidden_states` are zeros).
        `frame_mask` `(batch, media, frames)` (the processor's, when media hold different numbers of frames) marks the
        real frames of 6-D pixel_values.
        `media_key_values` (from `get_media_key_values`) replaces pixel_values when the images were encoded already;
        `media_index` (from `media_index()` on the full sequence) is needed when decoding new tokens against `cache`.
        """
        image_features, outputs = self._run(
            self.language_model.base_model, input_ids, pixel_values, media_key_values, media_index, cache, frame_mask,
            attention_mask=attention_mask, use_cache=use_cache, **kwargs,
        )
        return OtterModelOutputWithPast(
            last_hidden_state=outputs.last_hidden_state,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_hidden_states=image_features,
        )


class OtterForConditionalGeneration(OtterModel, GenerationMixin):
    """Otter with the language-modelling head: loss, logits and `generate()` conditioned on interleaved images."""

    def __init__(self, config: OtterConfig, vision_model: CLIPVisionModel | None = None,
                 language_model: PreTrainedModel | None = None):
        super().__init__(config, vision_model=vision_model, language_model=language_model)
        # generation stops at <|endofchunk|> and pads with the pad token unless told otherwise
        if config.eoc_token_id is not None:
            self.generation_config.eos_token_id = config.eoc_token_id
        if config.pad_token_id is not None:
            self.generation_config.pad_token_id = config.pad_token_id
        # MPT configs ship use_cache=False (a training setting), which would make every decode step recompute the
        # whole sequence; cached decoding is exact, so it is the default for every family
        self.generation_config.use_cache = True

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = None,
        media_key_values: torch.Tensor | None = None,
        media_index: torch.LongTensor | None = None,
        frame_mask: torch.Tensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> OtterCausalLMOutputWithPast:
        r"""
        As `OtterModel.forward`, plus `labels` `(batch, text_len)`: the loss is the language model's shifted
        cross-entropy, ignoring -100; and `logits_to_keep`: the logits of the last `logits_to_keep` positions only
        (0: all), as in transformers' causal LMs (`generate()` asks for the last one).
        """
        image_features, outputs = self._run(
            self.language_model, input_ids, pixel_values, media_key_values, media_index, cache, frame_mask,
            attention_mask=attention_mask, labels=labels, use_cache=use_cache, logits_to_keep=logits_to_keep, **kwargs,
        )
        return OtterCausalLMOutputWithPast(
            loss=outputs.loss,
            logits=outputs.logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_hidden_states=image_features,
        )

    @torch.no_grad()
    def generate(self, input_ids=None, pixel_values=None, attention_mask=None, **kwargs):
        """
        `generate()` on interleaved images and text. The images are encoded once, and each cross-attention block's
        media keys/values computed once, before decoding starts; decoding stops at `<|endofchunk|>` by default.
        A generated `<image>` token has no image behind it: the tokens after it keep reading the prompt's last image.
        With several beams (or returned sequences) per prompt and the KV cache on, the prompt runs once per sample,
        not once per beam: its cache is then repeated for the beams.
        """
        pixel_values = self.batched_pixel_values(pixel_values, input_ids)
        config = kwargs.get("generation_config") or self.generation_config
        for name in ("num_beams", "num_return_sequences"):
            value = kwargs.get(name, getattr(config, name, None))
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if input_ids is not None:
            new_tokens = kwargs.get("max_new_tokens", config.max_new_tokens)
            if new_tokens is None:  # transformers' max_length counts the prompt
                new_tokens = max((kwargs.get("max_length", config.max_length) or 0) - input_ids.shape[-1], 0)
            self._check_prompt(input_ids, pixel_values is not None or kwargs.get("media_key_values") is not None,
                               new_tokens)
        if pixel_values is not None:
            _, per_block = self._media_key_values_for(pixel_values, kwargs.get("media_key_values"), input_ids,
                                                      kwargs.pop("frame_mask", None))
            # stacked, batch first: generate() repeats it for beams and returned sequences
            kwargs["media_key_values"] = torch.stack(per_block, 1)
        if kwargs.get("media_key_values") is not None:
            if input_ids is None:
                raise ValueError("Otter needs input_ids to locate <image> tokens; inputs_embeds alone is not enough")
            prompt_media = self.media_index(input_ids)[:, -1]
            self._check_media_count(prompt_media, self._num_media(kwargs["media_key_values"]))
            kwargs["prompt_media"] = prompt_media
        copies = self._prompt_copies(input_ids, attention_mask, kwargs)
        if copies > 1:
            if attention_mask is None:
                attention_mask = torch.ones_like(input_ids)
            kwargs["cache"] = self._shared_prompt_cache(input_ids, attention_mask, kwargs.get("media_key_values"),
                                                        copies)
        return super().generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    _OUTPUTS_OF_EVERY_PROMPT_POSITION = ("output_attentions", "output_hidden_states")

    def _prompt_copies(self, input_ids, attention_mask, kwargs) -> int:
        """
        How many rows `generate()` will make of each prompt (beams, returned sequences) when their prompt can run once
        and its cache be shared: cached decoding, no cache, cache implementation or embeddings given, no outputs asked
        of every prompt position, and a mask given or no padding to infer one from. 1 when the prompt should run as
        usual.
        """
        config = kwargs.get("generation_config") or self.generation_config
        setting = lambda name: kwargs.get(name, getattr(config, name, None))  # noqa: E731
        copies = max(setting("num_beams") or 1, setting("num_return_sequences") or 1)
        pad = setting("pad_token_id")
        if (copies == 1 or not setting("use_cache") or input_ids is None or input_ids.shape[1] < 2
                or any(kwargs.get(name) is not None for name in ("cache", "past_key_values", "inputs_embeds",
                                                                 "assistant_model"))
                or setting("cache_implementation") is not None or setting("prefill_chunk_size") is not None
                or any(setting(name) for name in self._OUTPUTS_OF_EVERY_PROMPT_POSITION)
                or (attention_mask is None and pad is not None and bool((input_ids == pad).any()))):
            return 1
        return copies

    def _shared_prompt_cache(self, input_ids, attention_mask, media_key_values, copies: int) -> Cache:
        """
        The KV cache of every prompt token but the last, computed once per sample and repeated `copies` times
        (row b * copies + j: copy j of sample b, as `generate()` expands its inputs); `generate()` then runs only the
        last prompt token, on every row, and goes on decoding.
        """
        prefix = OtterModel.forward(self, input_ids=input_ids[:, :-1], attention_mask=attention_mask[:, :-1],
                                    media_key_values=media_key_values, use_cache=True)
        cache = prefix.cache
        cache.batch_repeat_interleave(copies)
        return cache

    def prepare_inputs_for_generation(self, input_ids, media_key_values=None, prompt_media=None, media_index=None,
                                      **kwargs):
        model_inputs = super().prepare_inputs_for_generation(input_ids, **kwargs)
        if media_key_values is not None:
            new_tokens = model_inputs["input_ids"].shape[1]
            model_inputs["media_key_values"] = media_key_values
            model_inputs["media_index"] = self.media_index(input_ids)[:, -new_tokens:].minimum(prompt_media[:, None])
        return model_inputs


__all__ = ["OtterPreTrainedModel", "OtterModel", "OtterForConditionalGeneration", "DamagedModelError"]
