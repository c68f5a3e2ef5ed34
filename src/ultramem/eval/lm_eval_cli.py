"""`python -m ultramem.eval.lm_eval_cli ...`: lm-eval's command line with `--model ultramem`
registered and our task YAMLs on the include path (see `ultramem.eval.lm_eval_adapter`)."""

from ultramem.eval.lm_eval_adapter import main

if __name__ == "__main__":
    main()
