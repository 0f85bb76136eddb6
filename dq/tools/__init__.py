"""User tools that drive DVC (the experiment queue, remote repair); no stage imports them."""
