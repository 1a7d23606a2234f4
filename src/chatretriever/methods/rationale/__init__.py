"""Hidden-rationale retrieval (issue 16): the RaHoRe binary-choice reranker, its supervised and
DPO tuning, Rabtriever distillation into a bi-encoder student, and the ESConv tasks.

Modules: `tasks` (ESConv strategy / response retrieval, splits, class prior; torch-free),
`prompts` (the two wordings, prompt token ids), `scoring` (one-pass option logits with and
without a document's KV cache), `reranker` (`BinaryChoiceReranker`), `tuning` (SFT and DPO
data and training), `distill` (the Rabtriever student and its losses).
"""
