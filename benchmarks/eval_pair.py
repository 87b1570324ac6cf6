"""Real pretrain-then-finetune pairs for `lowrank-tools evaluate` (issue 15's reference figures).

    python benchmarks/eval_pair.py OUT            # ~3 minutes on 2 busy CPU cores; needs transformers + tokenizers

writes OUT/causal/{base,tuned,heldout.txt} (a 4-layer Llama) and OUT/encoder/{base,tuned,heldout.txt} (a 2-layer
BertForMaskedLM). Task A, the "pretraining": texts from a Markov chain over 48 words (each word has three likely
successors). Task B, the fine-tune: the same chain with the successors of 12 words changed. Every weight is
trained with AdamW on A, then every weight (norms included) is trained with AdamW on B: a genuine full fine-tune,
not a planted delta. heldout.txt holds task-B texts never trained on. The encoder is undertrained (MLM loss
3.4 after pretraining, ln 53 = 4.0 at chance): enough for a real delta, not for a meaningful encoder. Then, e.g.:

    lowrank-tools evaluate OUT/causal/base OUT/causal/tuned --data OUT/causal/heldout.txt \\
        --ranks 1,2,4,8,16,32,64 --budgets 5000,10000,20000,40000,80000,160000 --energies 0.5,0.8,0.9,0.95,0.99 \\
        --json OUT/causal.json --plot OUT/causal-plots
    lowrank-tools evaluate OUT/causal/base OUT/causal/tuned --data OUT/causal/heldout.txt \\
        --ranks 1,2,4,8,16,32 --dora --batch-size 16 --device cpu --json OUT/dora.json   # DoRA r vs LoRA r, r + 1
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

WORDS = [f"w{i}" for i in range(48)]


def chains(seed: int = 0, changed: int = 12):
    g = torch.Generator().manual_seed(seed)
    succ_a = torch.stack([torch.randperm(len(WORDS), generator=g)[:3] for _ in WORDS])  # (48, 3)
    succ_b = succ_a.clone()
    for i in torch.randperm(len(WORDS), generator=g)[:changed]:
        succ_b[i] = torch.randperm(len(WORDS), generator=g)[:3]
    return succ_a, succ_b


def sample(succ, n: int, seed: int, length: tuple[int, int] = (8, 24)) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    probs = torch.tensor([0.6, 0.3, 0.1])
    texts = []
    for _ in range(n):
        k = int(torch.randint(*length, (1,), generator=g))
        w = int(torch.randint(0, len(WORDS), (1,), generator=g))
        words = [w]
        for _ in range(k - 1):
            w = int(succ[w][torch.multinomial(probs, 1, generator=g)])
            words.append(w)
        texts.append(" ".join(WORDS[i] for i in words))
    return texts


def tokenizer(bert: bool):
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] if bert else ["[PAD]", "[UNK]", "[BOS]"]
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([" ".join(WORDS)], trainers.WordLevelTrainer(special_tokens=specials))
    if bert:
        return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                                    cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                                bos_token="[BOS]")


def train(model, tok, texts, steps: int, lr: float, seed: int, mlm: bool = False) -> float:
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(texts), (16,), generator=g)
        batch = tok([texts[i] for i in idx], padding=True, return_tensors="pt")
        ids, mask = batch["input_ids"], batch["attention_mask"]
        if mlm:
            hide = (torch.rand(ids.shape, generator=g) < 0.15) & (mask == 1)
            labels = ids.masked_fill(~hide, -100)
            ids = ids.masked_fill(hide, tok.mask_token_id)
        else:
            labels = ids.masked_fill(mask == 0, -100)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return float(loss.detach())


def save(model, tok, folder: Path) -> None:
    model.save_pretrained(folder)
    tok.save_pretrained(folder)


def causal(out: Path, succ_a, succ_b) -> None:
    tok = tokenizer(bert=False)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=176, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=4, vocab_size=len(tok),
                                      max_position_embeddings=64, tie_word_embeddings=False, bos_token_id=2,
                                      pad_token_id=0, eos_token_id=None)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    print("causal pretrain loss", train(model, tok, sample(succ_a, 4000, seed=1), 250, 5e-3, seed=2), flush=True)
    save(model, tok, out / "base")
    print("causal finetune loss", train(model, tok, sample(succ_b, 4000, seed=3), 120, 2e-3, seed=4), flush=True)
    save(model, tok, out / "tuned")
    (out / "heldout.txt").write_text("\n".join(sample(succ_b, 256, seed=5)) + "\n")


def encoder(out: Path, succ_a, succ_b) -> None:
    tok = tokenizer(bert=True)
    config = transformers.BertConfig(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=176, max_position_embeddings=64, pad_token_id=0)
    torch.manual_seed(0)
    model = transformers.BertForMaskedLM(config)
    print("encoder pretrain loss", train(model, tok, sample(succ_a, 4000, seed=11), 250, 5e-3, 12, mlm=True),
          flush=True)
    save(model, tok, out / "base")
    print("encoder finetune loss", train(model, tok, sample(succ_b, 4000, seed=13), 120, 2e-3, 14, mlm=True),
          flush=True)
    save(model, tok, out / "tuned")
    (out / "heldout.txt").write_text("\n".join(sample(succ_b, 256, seed=15)) + "\n")


if __name__ == "__main__":
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "eval-pair")
    succ_a, succ_b = chains()
    causal(root / "causal", succ_a, succ_b)
    encoder(root / "encoder", succ_a, succ_b)
    print(f"wrote {root}/causal and {root}/encoder")
