"""Write a tiny stand-in Sa2VA checkpoint directory: same loading path and inference interface, CPU-sized.

The real model cannot be downloaded here, so this mirrors what SA2VA.md says the adapter relies on:
a `config.json` whose `auto_map` sends AutoConfig/AutoModel to `Sa2VAChatConfig`/`Sa2VAChatModel`
in remote-code files beside it, a slow tokenizer loaded by remote code, and a model whose
`predict_forward(image=, text=, tokenizer=)` computes `[T, 1, 1024, 1024]` float32 logits in
`grounding_encoder.language_embd_inference` from the image resized to 1024x1024 (aspect ignored),
resizes them bilinearly (align_corners=False) to (H, W), takes channel 0 and returns
`sigmoid() > 0.5` as bool `(1, H, W)` arrays, one per generated `[SEG]` (none: empty list).

The "generation" is a rule instead of an LLM, so tests can steer it: a prompt containing
"nothing" or an all-black image gives no `[SEG]`; "every" gives two. Config switches:
`call_post_init=False`
leaves out `self.post_init()` like Sa2VA's shipped code (transformers 5 then fails in
`from_pretrained` unless the adapter's shim runs); `sabotage=True` returns masks that disagree with
the logits (the self-check must catch it); `init_error="..."` makes loading fail with that
AttributeError (version breakage). The modeling file always keeps an un-executed `import flash_attn`
that transformers' import check sees, as Sa2VA's files do.
"""

from __future__ import annotations

import json
from pathlib import Path

CONFIG_PY = """
from transformers import PretrainedConfig


class Sa2VAChatConfig(PretrainedConfig):
    model_type = "sa2va_standin_chat"

    def __init__(self, hidden=16, n_layers=3, vocab=300, prompt_dim=8, call_post_init=True,
                 sabotage=False, init_error=None, **kwargs):
        self.hidden = hidden
        self.n_layers = n_layers
        self.vocab = vocab
        self.prompt_dim = prompt_dim
        self.call_post_init = call_post_init
        self.sabotage = sabotage
        self.init_error = init_error
        super().__init__(**kwargs)
"""

MODELING_PY = '''
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from .configuration_sa2va_chat import Sa2VAChatConfig

USE_FLASH_ATTN = False
if USE_FLASH_ATTN:  # never runs; transformers' import check still sees it, as in Sa2VA's files
    from flash_attn import flash_attn_func  # noqa: F401

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


class SAM2Standin(nn.Module):
    """Image encoder + mask decoder: 256x256 logits from a prompt embedding, upsampled to 1024x1024."""

    def __init__(self, prompt_dim):
        super().__init__()
        self.image_encoder = nn.Conv2d(3, prompt_dim, kernel_size=4, stride=4)
        self.mask_decoder = nn.Conv2d(prompt_dim, prompt_dim, kernel_size=3, padding=1)

    def preprocess_image(self, image_uint8_chw):
        return (image_uint8_chw.float() / 255.0 - IMAGENET_MEAN) / IMAGENET_STD

    def get_sam2_embeddings(self, g_pixel_values):
        return self.mask_decoder(torch.relu(self.image_encoder(g_pixel_values.to(self.image_encoder.weight.dtype))))

    def language_embd_inference(self, sam_states, language_embeds):
        frames = []
        for feats, embed in zip(sam_states, language_embeds):
            low = torch.einsum("chw,c->hw", feats.float(), embed[0].float())
            low = (low - low.mean()) / (low.std() + 1e-6) * 4.0  # both classes present
            frames.append(low[None, None])
        low_res = torch.cat(frames)  # [T, 1, 256, 256]
        return F.interpolate(low_res, size=(1024, 1024), mode="bilinear", align_corners=False)


class TinyLM(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(config.vocab, config.hidden)
        self.model.layers = nn.ModuleList(nn.Linear(config.hidden, config.hidden) for _ in range(config.n_layers))
        self.model.norm = nn.LayerNorm(config.hidden)
        self.lm_head = nn.Linear(config.hidden, config.vocab, bias=False)

    def last_hidden(self, embeds):
        x = embeds
        for layer in self.model.layers:
            x = x + torch.tanh(layer(x))
        return self.model.norm(x)


class Sa2VAChatModel(PreTrainedModel):
    config_class = Sa2VAChatConfig
    base_model_prefix = "standin"
    _no_split_modules = ["SAM2Standin"]

    def __init__(self, config, use_flash_attn=True):
        super().__init__(config)
        if config.init_error:
            raise AttributeError(config.init_error)
        self.vision_model = nn.Conv2d(3, config.hidden, kernel_size=16, stride=16)
        self.mlp1 = nn.Linear(config.hidden, config.hidden)
        self.language_model = TinyLM(config)
        self.text_hidden_fcs = nn.Sequential(
            nn.Linear(config.hidden, config.hidden), nn.ReLU(), nn.Linear(config.hidden, config.prompt_dim)
        )
        self.grounding_encoder = SAM2Standin(config.prompt_dim)
        self.init_prediction_config = False
        if config.call_post_init:
            self.post_init()

    def preparing_for_generation(self, tokenizer, max_new_tokens=2048, torch_dtype=torch.bfloat16):
        self.tokenizer = tokenizer
        self.torch_dtype = torch_dtype
        self.max_dynamic_patch = 12
        self.init_prediction_config = True

    def _answer(self, image, text):
        if "nothing" in text or not np.asarray(image).any():
            return "Sorry, I cannot find it."
        return "They are [SEG] and [SEG]." if "every" in text else "It is [SEG]."

    def predict_forward(self, image=None, text=None, tokenizer=None, prediction_only=True, **kwargs):
        if not self.init_prediction_config:
            assert tokenizer
            self.preparing_for_generation(tokenizer=tokenizer)
        assert "<image>" in text
        dtype = self.vision_model.weight.dtype
        w, h = image.size
        tiles = min(self.max_dynamic_patch, 1 + (w * h) // (448 * 448))
        thumb = torch.from_numpy(np.array(image.resize((64, 64)))).permute(2, 0, 1).float() / 255.0
        image_tokens = self.mlp1(self.vision_model(thumb[None].to(dtype)).flatten(2).transpose(1, 2))[0]
        ids = torch.tensor(self.tokenizer.encode(text))
        prompt = torch.cat([image_tokens.repeat(tiles, 1), self.language_model.model.embed_tokens(ids)])
        predict = self._answer(image, text)
        if prediction_only:
            return {"prediction": predict, "prediction_masks": None}
        n_seg = predict.count("[SEG]")
        seg_positions = prompt.mean(0, keepdim=True) + torch.arange(n_seg, dtype=dtype)[:, None]
        seg_hidden_states = self.language_model.last_hidden(seg_positions)
        all_seg_hidden_states = self.text_hidden_fcs(seg_hidden_states)

        g_image = np.array(image.resize((1024, 1024)))  # SAM2 input: aspect ratio ignored
        g_pixel_values = torch.stack(
            [self.grounding_encoder.preprocess_image(torch.from_numpy(g_image).permute(2, 0, 1))]
        ).to(dtype)
        ret_masks = []
        for seg_hidden_state in all_seg_hidden_states:
            sam_states = self.grounding_encoder.get_sam2_embeddings(g_pixel_values)
            pred_masks = self.grounding_encoder.language_embd_inference(sam_states, [seg_hidden_state[None]])
            masks = F.interpolate(pred_masks, size=(h, w), mode="bilinear", align_corners=False)
            masks = masks[:, 0]
            masks = masks.sigmoid() > 0.5
            if self.config.sabotage:
                masks = ~masks
            ret_masks.append(masks.cpu().numpy())
        return {"prediction": predict, "prediction_masks": ret_masks}
'''

TOKENIZER_PY = '''
from transformers import PreTrainedTokenizer

SPECIALS = ["<unk>", "<s>", "</s>", "[SEG]", "<image>"]


class StandinTokenizer(PreTrainedTokenizer):
    """Bytes as tokens plus Sa2VA's special tokens; no vocabulary file needed."""

    vocab_files_names = {}

    def __init__(self, **kwargs):
        self._vocab = {t: i for i, t in enumerate(SPECIALS)}
        self._vocab.update({chr(b): len(SPECIALS) + b for b in range(256)})
        self._inverse = {i: t for t, i in self._vocab.items()}
        kwargs.setdefault("unk_token", "<unk>")
        kwargs.setdefault("bos_token", "<s>")
        kwargs.setdefault("eos_token", "</s>")
        super().__init__(**kwargs)

    @property
    def vocab_size(self):
        return len(self._vocab)

    def get_vocab(self):
        return dict(self._vocab)

    def _tokenize(self, text, **kwargs):
        return [c if c in self._vocab else "<unk>" for c in text]

    def _convert_token_to_id(self, token):
        return self._vocab.get(token, 0)

    def _convert_id_to_token(self, index):
        return self._inverse.get(index, "<unk>")

    def save_vocabulary(self, save_directory, filename_prefix=None):
        return ()
'''


def write_standin(
    root: str | Path,
    *,
    call_post_init: bool = True,
    sabotage: bool = False,
    init_error: str | None = None,
    seed: int = 0,
) -> Path:
    """Write the stand-in checkpoint into `root` (created) and return it. CPU only, ~1 s."""
    import torch
    from transformers import AutoConfig, AutoModel

    from distill.teachers.sa2va import flash_attn_optional

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / "configuration_sa2va_chat.py").write_text(CONFIG_PY)
    (root / "modeling_sa2va_chat.py").write_text(MODELING_PY)
    (root / "tokenization_standin.py").write_text(TOKENIZER_PY)
    auto_map = {
        "AutoConfig": "configuration_sa2va_chat.Sa2VAChatConfig",
        "AutoModel": "modeling_sa2va_chat.Sa2VAChatModel",
        "AutoModelForCausalLM": "modeling_sa2va_chat.Sa2VAChatModel",
    }
    config = {"model_type": "sa2va_standin_chat", "architectures": ["Sa2VAChatModel"], "auto_map": auto_map}
    (root / "config.json").write_text(json.dumps(config, indent=2))
    (root / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "StandinTokenizer",
                "auto_map": {"AutoTokenizer": ["tokenization_standin.StandinTokenizer", None]},
            }
        )
    )
    # Weights are written by a model that calls post_init (so saving works on every transformers
    # line); the variant switches are plain config values read by the same remote code.
    torch.manual_seed(seed)
    with flash_attn_optional():
        config = AutoConfig.from_pretrained(root, trust_remote_code=True)
        model = AutoModel.from_config(config, trust_remote_code=True)
    model.config.call_post_init = call_post_init
    model.config.sabotage = sabotage
    model.config.init_error = init_error
    model.save_pretrained(root)
    return root
