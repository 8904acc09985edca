"""Secure aggregation core: key agreement, mask expansion, shares, exact fixed-point sums.

The protocol stages (SecAgg+ shape, Bell et al. CCS 2020) live in the server workflow and the
client mod; this package holds only the cryptographic building blocks they use.
"""
