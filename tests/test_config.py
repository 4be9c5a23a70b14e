import os

import pytest
import yaml

from segslim.config import load_config, load_yaml, merge, parse_opts, save_config
from segslim.errors import UserError

QUICK = os.path.join(os.path.dirname(__file__), '..', 'configs', 'quick_start',
                     'bisenet_optic_disc_512x512_1k.yml')


def write(path, data):
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return str(path)


def test_base_merge_order_child_wins_and_lists_replace(tmp_path):
    write(tmp_path / 'base.yml', {'a': {'x': 1, 'y': 2}, 'l': [1, 2, 3], 'k': 'base'})
    write(tmp_path / 'mid.yml', {'_base_': 'base.yml', 'a': {'y': 20}, 'k': 'mid'})
    child = write(tmp_path / 'child.yml', {'_base_': 'mid.yml', 'l': [9], 'a': {'z': 3}})
    cfg = load_yaml(child)
    assert cfg == {'a': {'x': 1, 'y': 20, 'z': 3}, 'l': [9], 'k': 'mid'}


def test_base_list_later_base_wins(tmp_path):
    write(tmp_path / 'one.yml', {'v': 1, 'only1': True})
    write(tmp_path / 'two.yml', {'v': 2})
    child = write(tmp_path / 'c.yml', {'_base_': ['one.yml', 'two.yml']})
    assert load_yaml(child) == {'v': 2, 'only1': True}


def test_inherited_false_replaces_dict():
    base = {'model': {'type': 'A', 'depth': 50, 'keep': 1}}
    child = {'model': {'_inherited_': False, 'type': 'B'}}
    assert merge(base, child) == {'model': {'type': 'B'}}


def test_opts_parsing_literals_and_strings():
    parsed = parse_opts(['a.b=3', 'c=[1, 2]', 'd=hello', 'e=None', 'f=0.5', 'g=True'])
    assert parsed == {'a.b': 3, 'c': [1, 2], 'd': 'hello', 'e': None, 'f': 0.5, 'g': True}
    with pytest.raises(UserError, match='key.sub=value'):
        parse_opts(['novalue'])
    with pytest.raises(UserError, match='empty part'):
        parse_opts(['a..b=1'])


def test_precedence_yaml_flags_opts():
    cfg = load_config(QUICK, iters=7, batch_size=3, learning_rate=0.5,
                      opts=['batch_size=5', 'model.align_corners=True'])
    assert cfg['iters'] == 7
    assert cfg['batch_size'] == 5  # --opts beats --batch_size
    assert cfg['lr_scheduler']['learning_rate'] == 0.5
    assert cfg['model']['align_corners'] is True
    assert cfg['loss']['coef'] == [1, 1, 1, 1, 1]


def test_a_learning_rate_at_the_warmup_start_moves_the_warmup_down(tmp_path):
    from segslim.builder import build_lr_scheduler
    street = os.path.join(os.path.dirname(QUICK), '..', 'street',
                          'pp_liteseg_stdc1_street_256x128.yml')
    # AdamW at 0.001 warming up from 1e-4; QAT at a tenth of it
    cfg = load_config(street, learning_rate=1e-4)
    assert cfg['lr_scheduler']['warmup_start_lr'] == pytest.approx(1e-5)
    assert build_lr_scheduler(cfg).get_lr() == pytest.approx(1e-5)
    assert load_config(street, learning_rate=5e-4)['lr_scheduler']['warmup_start_lr'] == 1e-4
    write(tmp_path / 'w.yml', {'_base_': street, 'lr_scheduler': {'warmup_start_lr': 0.002}})
    with pytest.raises(UserError, match='lr_scheduler.warmup_start_lr'):
        build_lr_scheduler(load_config(str(tmp_path / 'w.yml')))


def test_unknown_opts_key_names_it():
    with pytest.raises(UserError, match="unknown key 'modle'"):
        load_config(QUICK, opts=['modle.type=X'])
    with pytest.raises(UserError, match='does not exist'):
        load_config(QUICK, opts=['model.backbone.depth=3'])


def test_cyclic_and_missing_base(tmp_path):
    write(tmp_path / 'a.yml', {'_base_': 'b.yml'})
    write(tmp_path / 'b.yml', {'_base_': 'a.yml'})
    with pytest.raises(UserError, match='cyclic'):
        load_yaml(str(tmp_path / 'a.yml'))
    write(tmp_path / 'c.yml', {'_base_': 'nope.yml'})
    with pytest.raises(UserError, match='nope.yml'):
        load_yaml(str(tmp_path / 'c.yml'))


def test_yaml_syntax_error_names_line(tmp_path):
    bad = write(tmp_path / 'bad.yml', 'model:\n  type: BiSeNetV2\n  x: [1, 2\n')
    with pytest.raises(UserError, match=r'bad.yml line \d+: YAML syntax error'):
        load_yaml(bad)


def test_required_key_and_nonpositive_flags(tmp_path):
    cfg = load_yaml(QUICK)
    del cfg['model']
    path = write(tmp_path / 'nomodel.yml', cfg)
    with pytest.raises(UserError, match='`model` is missing'):
        load_config(path)
    with pytest.raises(UserError, match='--iters must be positive'):
        load_config(QUICK, iters=0)


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(QUICK, iters=11)
    path = save_config(cfg, str(tmp_path / 'run'))
    assert yaml.safe_load(open(path)) == cfg
