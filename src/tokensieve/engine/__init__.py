"""Engines that run models over datasets: evaluation (and, later, training)."""
