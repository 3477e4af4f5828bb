"""Validator rules, one topic per module; the ordered list lives in ``tiexport.validators.registry``."""
