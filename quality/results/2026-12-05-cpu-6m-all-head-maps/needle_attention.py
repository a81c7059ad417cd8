"""Attention mass per (layer, KV head) on the passkey's digit tokens (transformers, fp32,
eager attention), over the same passkey prompts the harness served; a diagnostic of which
heads read the needle, not part of the product.

    python quality/results/2026-12-05-cpu-6m-all-head-maps/needle_attention.py TASKS.json OUT.json
(TASKS.json: the harness's raw/tasks.json of the run)"""
import json, sys, time, torch
from transformers import AutoTokenizer, AutoModelForCausalLM
torch.set_num_threads(1)
M = "quality/models/sotu-llama-6m"
tok = AutoTokenizer.from_pretrained(M)
model = AutoModelForCausalLM.from_pretrained(M, dtype=torch.float32, attn_implementation="eager").eval()
work = json.load(open(sys.argv[1]))
enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]
L, H, G = 4, 4, 2  # layers, query heads, query heads per KV head
SINK, RECENT = 64, 256
lim = None
rows = []
for i, p in enumerate(work["passkey"][:lim]):
    ids, key = p["ids"], p["key"]
    needle = enc(" The pass key is {k}. Remember it. {k} is the pass key.".format(k=key))
    n0 = next(j for j in range(len(ids)) if ids[j:j + len(needle)] == needle)
    digit = [n0 + j for j, t in enumerate(needle) if any(c.isdigit() for c in tok.decode([t]))]
    ans = enc(" " + key)
    full = ids + ans
    qpos = list(range(len(ids) - 1, len(full) - 1))  # last prompt pos + answer positions that predict the next answer token
    t0 = time.time()
    with torch.no_grad():
        out = model(torch.tensor([full]), output_attentions=True)
    lp = torch.log_softmax(out.logits[0, qpos], -1)
    ans_lp = float(sum(lp[j, a] for j, a in enumerate(ans)))
    greedy = [int(x) for x in out.logits[0, qpos].argmax(-1)]
    digit_t = torch.tensor(digit)
    mass = torch.zeros(L, H, len(qpos)); outside = torch.zeros(L, H, len(qpos))
    for l, a in enumerate(out.attentions):
        A = a[0][:, qpos]  # H x Q x K
        mass[l] = A[:, :, digit_t].sum(-1)
        for qi, q in enumerate(qpos):
            outside[l, :, qi] = A[:, qi, SINK:max(SINK, q - RECENT + 1)].sum(-1)
    # KV head h = query heads h*G .. h*G+G-1; mean over query positions, max over the query heads
    kv_mass = mass.mean(-1).view(L, H // G, G).max(-1).values
    kv_mass_maxq = mass.max(-1).values.view(L, H // G, G).max(-1).values
    kv_out = outside.mean(-1).view(L, H // G, G).max(-1).values
    rows.append(dict(i=i, depth=p["depth"], key=key, needle_pos=n0, digits=digit, n_q=len(qpos),
                     answer_logprob=round(ans_lp, 3), greedy_ok=greedy == ans,
                     mass=kv_mass.tolist(), mass_maxq=kv_mass_maxq.tolist(), outside=kv_out.tolist(),
                     mass_qhead=mass.mean(-1).tolist(), s=round(time.time() - t0, 1)))
    print(i, p["depth"], key, n0, len(digit), "ok" if greedy == ans else "MISS", rows[-1]["s"], "s", flush=True)
json.dump(rows, open(sys.argv[2], "w"))
