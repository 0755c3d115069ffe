"""`lmforge ui`, the board: a JSON API and one page over a workspace; the work is done by `lmforge` children."""
