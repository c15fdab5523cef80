"""Plotting on top of Captum's visualization module."""
