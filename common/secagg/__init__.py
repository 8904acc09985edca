"""Secure aggregation core: key agreement, mask expansion, shares, exact fixed-point sums.

``masks``, ``quantize``, ``shares`` and ``identity`` are the cryptographic building blocks;
``protocol`` holds the SecAgg+ stages (Bell et al. CCS 2020) as transport-independent site
and server state machines, which the Flower workflow and client mod carry as messages.
"""
