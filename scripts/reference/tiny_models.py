#!/usr/bin/env python3
"""Builds tiny random-weight Llama, Gemma, Gemma 2 and Gemma 3 checkpoints with transformers and records what
qlora-rt must reproduce: logits and loss for fixed token ids, and with a LoRA adapter (peft, all linear layers,
non-zero B so every gradient is non-zero) the loss and the adapter gradients. With CUDA and bitsandbytes present
it also records the logits of the same model loaded in 4-bit NF4 (double quant) by transformers + bitsandbytes.

Run: python3 scripts/reference/tiny_models.py --out tests/fixtures/models
Writes, per family: {out}/{family}/config.json, model.safetensors (f32), adapter/ (PEFT files),
tokenizer.json + tokenizer_config.json (one tiny BPE tokenizer shared by all families, vocab 101 as the models,
pad/bos/eos = 0/1/2; `--tokenizers-only` writes just these two files and needs only the `tokenizers` package) and
{out}/{family}/reference.safetensors with tensors:
  input_ids [T] i32, logits [T, V] f32, loss [1] f32,
  lora_loss [1] f32, grad.<peft key> for every lora_A / lora_B weight,
  (CUDA only) nf4_logits [T, V] f32.
Versions used are written to {out}/versions.json.
"""
import argparse
import json
import os

T = 12  # tokens per fixture sequence; > the sliding windows below, so local layers really slide


FAMILIES = ["llama", "gemma", "gemma2", "gemma3"]
TOKENIZER_SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>"]  # ids 0..5
TOKENIZER_CORPUS = [
    "the quick brown fox jumps over the lazy dog.",
    "hello world! this is a tiny tokenizer for tests.",
    "she sells sea shells on the sea shore, and the shells she sells are sea shells.",
    "one two three four five six seven eight nine ten.",
    "user: what is the answer? assistant: the answer is 42.",
]
CHATML = ("{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def write_tokenizer(d, vocab_size=101):
    """A Llama-2-style tokenizer (BPE over characters, metaspace, BOS added by the post-processor) trained on a
    fixed corpus to exactly the models' vocabulary; lowercase letters, digits and a little punctuation, anything
    else is <unk>. The trainer is deterministic, so reruns write the same files."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
    alphabet = ["\u2581", "\n"] + list("abcdefghijklmnopqrstuvwxyz0123456789.,!?':")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=TOKENIZER_SPECIALS,
                                  initial_alphabet=alphabet, show_progress=False)
    tok.train_from_iterator(TOKENIZER_CORPUS * 3, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    assert tok.get_vocab_size() == vocab_size, tok.get_vocab_size()
    assert [tok.token_to_id(t) for t in TOKENIZER_SPECIALS] == list(range(len(TOKENIZER_SPECIALS)))
    os.makedirs(d, exist_ok=True)
    tok.save(os.path.join(d, "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
              "pad_token": "<pad>", "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False,
              "model_max_length": 64, "chat_template": CHATML}
    with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=1)


def families():
    import transformers

    common = dict(vocab_size=101, hidden_size=32, intermediate_size=48, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
    llama = transformers.LlamaConfig(**common, num_hidden_layers=2, tie_word_embeddings=False,
                                     rope_theta=10000.0)
    gemma = transformers.GemmaConfig(**common, num_hidden_layers=2, head_dim=16,
                                     hidden_act="gelu_pytorch_tanh", hidden_activation="gelu_pytorch_tanh")
    gemma2 = transformers.Gemma2Config(**common, num_hidden_layers=2, head_dim=16, query_pre_attn_scalar=16,
                                       sliding_window=4, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                                       hidden_activation="gelu_pytorch_tanh")
    gemma3 = transformers.Gemma3TextConfig(**common, num_hidden_layers=3, head_dim=16, query_pre_attn_scalar=16,
                                           sliding_window=4,
                                           layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                                           hidden_activation="gelu_pytorch_tanh")
    return {
        "llama": (llama, transformers.LlamaForCausalLM),
        "gemma": (gemma, transformers.GemmaForCausalLM),
        "gemma2": (gemma2, transformers.Gemma2ForCausalLM),
        "gemma3": (gemma3, transformers.Gemma3ForCausalLM),
    }


def randomize_norms(model, gen):
    import torch

    # Norm weights start at 1 (Llama) or 0 (Gemma); random values make the (1 + w) offset observable.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--tokenizers-only", action="store_true",
                    help="write only tokenizer.json and tokenizer_config.json (no torch needed)")
    args = ap.parse_args()
    if args.tokenizers_only:
        for family in FAMILIES:
            write_tokenizer(os.path.join(args.out, family))
        return
    import peft
    import torch
    import transformers
    from safetensors.torch import save_file

    versions = {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}
    for family, (config, cls) in families().items():
        torch.manual_seed(0)
        gen = torch.Generator().manual_seed(1234)
        config._attn_implementation = "eager"
        model = cls(config).to(torch.float32).eval()
        randomize_norms(model, gen)
        d = os.path.join(args.out, family)
        os.makedirs(d, exist_ok=True)
        model.save_pretrained(d, safe_serialization=True)
        write_tokenizer(d)

        ids = torch.randint(3, config.vocab_size, (1, T), generator=gen)
        with torch.no_grad():
            out = model(input_ids=ids, labels=ids)
        ref = {"input_ids": ids[0].to(torch.int32), "logits": out.logits[0].float().contiguous(),
               "loss": out.loss.reshape(1).float()}

        lcfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear",
                               task_type="CAUSAL_LM")
        pm = peft.get_peft_model(model, lcfg)
        with torch.no_grad():
            for name, p in pm.named_parameters():
                if "lora_B" in name:
                    p.copy_(0.05 * torch.randn(p.shape, generator=gen))
        pm.train()
        out = pm(input_ids=ids, labels=ids)
        out.loss.backward()
        ref["lora_loss"] = out.loss.detach().reshape(1).float()
        for name, p in pm.named_parameters():
            if p.requires_grad:
                key = name.replace(".default", "")
                ref["grad." + key] = p.grad.detach().float().contiguous()
        pm.save_pretrained(os.path.join(d, "adapter"), safe_serialization=True)

        if torch.cuda.is_available():
            try:
                bnb = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                      bnb_4bit_use_double_quant=True,
                                                      bnb_4bit_compute_dtype=torch.float32)
                q = cls.from_pretrained(d, quantization_config=bnb, torch_dtype=torch.float32,
                                        attn_implementation="eager", device_map={"": 0}).eval()
                with torch.no_grad():
                    ref["nf4_logits"] = q(input_ids=ids.cuda()).logits[0].float().cpu().contiguous()
                versions["bitsandbytes"] = __import__("bitsandbytes").__version__
            except Exception as e:  # recorded, not fatal: the dense fixtures stand on their own
                print(f"{family}: no NF4 reference: {e}")
        save_file(ref, os.path.join(d, "reference.safetensors"))
        print(f"{family}: loss {ref['loss'].item():.6f}, lora loss {ref['lora_loss'].item():.6f}, "
              f"{sum(k.startswith('grad.') for k in ref)} adapter gradients")
    with open(os.path.join(args.out, "versions.json"), "w") as f:
        json.dump(versions, f, indent=1)


if __name__ == "__main__":
    main()
