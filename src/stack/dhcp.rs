//! The DHCPv4 server on the gateway: hands the guest its /30.
//!
//! Slot N of the pool gets the /30 at `pool base + 4N`: the gateway is `+1`, the guest `+2`.
//! The server answers DISCOVER with OFFER, REQUEST for the guest's address with ACK (anything
//! else with NAK) and INFORM with ACK; router and DNS are the gateway, the MTU goes in option 26.
//! There is one guest per link, so there is no lease table: the address is always the same.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use smoltcp::wire::{
    DhcpMessageType, DhcpOption, DhcpPacket, DhcpRepr, EthernetAddress, Ipv4Address,
};

/// DHCP option 26: interface MTU.
const OPTION_MTU: u8 = 26;

/// Addresses of one guest link, derived from the pool and the slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkAddrs {
    pub gateway: Ipv4Addr,
    pub guest: Ipv4Addr,
    pub prefix_len: u8,
}

impl LinkAddrs {
    /// The /30 of `slot` in `pool`; an error names the pool and the slot count it allows.
    pub fn for_slot(pool: Ipv4Net, slot: u32) -> Result<Self, String> {
        if pool.prefix_len() > 30 {
            return Err(format!(
                "ipv4_pool {pool}: prefix must be /30 or shorter (each guest needs a /30)"
            ));
        }
        let slots = 1u64 << (30 - pool.prefix_len());
        if u64::from(slot) >= slots {
            return Err(format!(
                "slot {slot} is outside ipv4_pool {pool}, which has slots 0..={}",
                slots - 1
            ));
        }
        let base = u32::from(pool.network()) + slot * 4;
        Ok(LinkAddrs {
            gateway: Ipv4Addr::from(base + 1),
            guest: Ipv4Addr::from(base + 2),
            prefix_len: 30,
        })
    }

    pub fn netmask(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::MAX << (32 - u32::from(self.prefix_len)))
    }
}

/// Server settings.
#[derive(Debug, Clone)]
pub struct DhcpServer {
    pub addrs: LinkAddrs,
    pub mtu: u16,
    pub lease_secs: u32,
}

/// A reply to send: the BOOTP payload and whether it must go to the broadcast address.
pub struct DhcpReply {
    pub payload: Vec<u8>,
    pub broadcast: bool,
}

impl DhcpServer {
    /// Handles one client message; `None` when it needs no answer or is malformed.
    pub fn handle(&self, message: &[u8]) -> Option<DhcpReply> {
        let packet = DhcpPacket::new_checked(message).ok()?;
        let request = DhcpRepr::parse(&packet).ok()?;
        let guest = self.addrs.guest;
        let reply_type = match request.message_type {
            DhcpMessageType::Discover => DhcpMessageType::Offer,
            DhcpMessageType::Request => {
                let wanted = request
                    .requested_ip
                    .or((!request.client_ip.is_unspecified()).then_some(request.client_ip));
                let for_us = request
                    .server_identifier
                    .is_none_or(|s| s == self.addrs.gateway);
                if !for_us {
                    return None;
                }
                if wanted == Some(guest) {
                    DhcpMessageType::Ack
                } else {
                    DhcpMessageType::Nak
                }
            }
            DhcpMessageType::Inform => DhcpMessageType::Ack,
            _ => return None,
        };
        let nak = reply_type == DhcpMessageType::Nak;
        let inform = request.message_type == DhcpMessageType::Inform;
        let mtu = self.mtu.to_be_bytes();
        let extra = [DhcpOption {
            kind: OPTION_MTU,
            data: &mtu,
        }];
        let mut dns = heapless_dns();
        if !nak {
            let _ = dns.push(self.addrs.gateway);
        }
        let reply = DhcpRepr {
            message_type: reply_type,
            transaction_id: request.transaction_id,
            secs: 0,
            client_hardware_address: request.client_hardware_address,
            client_ip: if inform {
                request.client_ip
            } else {
                Ipv4Address::UNSPECIFIED
            },
            your_ip: if nak || inform {
                Ipv4Address::UNSPECIFIED
            } else {
                guest
            },
            server_ip: Ipv4Address::UNSPECIFIED,
            router: (!nak).then_some(self.addrs.gateway),
            subnet_mask: (!nak).then_some(self.addrs.netmask()),
            relay_agent_ip: Ipv4Address::UNSPECIFIED,
            broadcast: request.broadcast,
            requested_ip: None,
            client_identifier: None,
            server_identifier: Some(self.addrs.gateway),
            parameter_request_list: None,
            dns_servers: (!nak).then_some(dns),
            max_size: None,
            lease_duration: (!nak && !inform).then_some(self.lease_secs),
            renew_duration: None,
            rebind_duration: None,
            additional_options: if nak { &[] } else { &extra },
        };
        let mut payload = vec![0u8; reply.buffer_len()];
        let mut out = DhcpPacket::new_unchecked(&mut payload[..]);
        reply.emit(&mut out).ok()?;
        Some(DhcpReply {
            payload,
            broadcast: request.broadcast || nak || request.client_ip.is_unspecified(),
        })
    }

    /// The client's MAC as written in a message, for addressing the reply.
    pub fn client_mac(message: &[u8]) -> Option<EthernetAddress> {
        let packet = DhcpPacket::new_checked(message).ok()?;
        Some(packet.client_hardware_address())
    }
}

/// smoltcp's DHCP representation carries DNS servers in a fixed-capacity vector.
fn heapless_dns() -> heapless::Vec<Ipv4Address, { smoltcp::wire::DHCP_MAX_DNS_SERVER_COUNT }> {
    heapless::Vec::new()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_carve_slash_30s() {
        let pool: Ipv4Net = "172.16.0.0/12".parse().unwrap();
        let s0 = LinkAddrs::for_slot(pool, 0).unwrap();
        assert_eq!(s0.gateway, Ipv4Addr::new(172, 16, 0, 1));
        assert_eq!(s0.guest, Ipv4Addr::new(172, 16, 0, 2));
        assert_eq!(s0.netmask(), Ipv4Addr::new(255, 255, 255, 252));
        let s3 = LinkAddrs::for_slot(pool, 3).unwrap();
        assert_eq!(s3.guest, Ipv4Addr::new(172, 16, 0, 14));
        let last = LinkAddrs::for_slot(pool, (1 << 18) - 1).unwrap();
        assert_eq!(last.guest, Ipv4Addr::new(172, 31, 255, 254));
        assert!(LinkAddrs::for_slot(pool, 1 << 18).is_err());
        assert!(LinkAddrs::for_slot("10.0.0.0/31".parse().unwrap(), 0).is_err());
    }
}
