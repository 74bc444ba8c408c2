//! The DHCPv4 server on the gateway: hands the guest its /30 (see `config::addressing`).
//!
//! The server answers DISCOVER with OFFER, REQUEST for the guest's address with ACK (anything
//! else with NAK) and INFORM with ACK; router and DNS are the gateway, the MTU goes in option 26.
//! There is one guest per link, so there is no lease table: the address is always the same.

use crate::config::addressing::LinkAddrs;
use smoltcp::wire::{
    DhcpMessageType, DhcpOption, DhcpPacket, DhcpRepr, EthernetAddress, Ipv4Address,
};

/// DHCP option 26: interface MTU.
const OPTION_MTU: u8 = 26;

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
    /// The reply gives the guest its address (an ACK to a REQUEST).
    pub leased: bool,
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
            leased: reply_type == DhcpMessageType::Ack && !inform,
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
