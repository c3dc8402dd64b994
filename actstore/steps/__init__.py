"""The pipeline's steps, one module each, talking to each other only through data on disk.

harvest → store → train → saes + curves → eval → records (+ recon in the store) → darkmatter, layers →
sql (actstore.analytics) → report, bundle; demo runs them all. `actstore` exports each step's function.
"""
