"""Evaluation: feature extractors and sources (features), the Fréchet distance (frechet), FID / IS / KID / precision
and recall (scores), the FID Inception network (inception), the project's digits classifier (digits), and FID during
training (periodic)."""
