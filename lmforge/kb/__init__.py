"""Knowledge base: documents → chunks → hybrid retrieval (BM25 + dense), with sources, beside fine-tuning."""
