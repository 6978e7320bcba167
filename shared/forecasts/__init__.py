"""Forecasts from stored models: batch scoring of request files through the scoring chain, and the
bounded model cache that batch scoring and the real-time server (:mod:`shared.serving`) share."""
