"""The checks that keep one recipient per envelope: the limits they share, the data-quality gate
on the frozen batches before approval, and the envelope guard on the bytes about to leave."""
